"""A model that cannot be loaded is named in one line that says what to do, before any weights load."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from arcflow.models import hub
from arcflow.models.hub import ModelUnavailable, is_local_path, reports_unavailable_model, require_pretrained


@pytest.mark.parametrize("value, local", [("black-forest-labs/FLUX.1-dev", False), ("Qwen/Qwen-Image", False),
                                          ("./models/flux", True), ("/abs/models/flux", True), ("flux", True),
                                          ("a/b/c", True)])
def test_hub_ids_and_local_paths_are_told_apart(value: str, local: bool) -> None:
    assert is_local_path(value) is local


def test_an_existing_folder_named_like_a_hub_id_is_local(tmp_path, monkeypatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_local_path("org/model")
    require_pretrained("org/model")


def test_a_missing_local_folder_is_named(tmp_path) -> None:
    with pytest.raises(ModelUnavailable, match=rf"model.pretrained: local folder {tmp_path}/nope does not exist"):
        require_pretrained(tmp_path / "nope")


def hub_response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/org/model/resolve/main/x"))


@pytest.mark.parametrize("error, words", [
    (GatedRepoError("gated", response=hub_response(403)), "is gated on the Hugging Face hub: accept its licence at "
                                             "https://huggingface.co/org/model and log in"),
    (RepositoryNotFoundError("missing", response=hub_response(404)), "is not on the Hugging Face hub, or is private"),
    (LocalEntryNotFoundError("offline"), "cannot be fetched from the Hugging Face hub"),
])
def test_each_hub_failure_says_what_to_do(monkeypatch, error: Exception, words: str) -> None:
    def fail(repo: str, filename: str) -> str:
        assert (repo, filename) == ("org/model", "model_index.json")
        raise error

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    with pytest.raises(ModelUnavailable) as caught:
        require_pretrained("org/model", "--base")
    message = str(caught.value)
    assert message.startswith("--base: org/model ") and words in message and "\n" not in message
    assert message.endswith("or point --base at a local diffusers folder")


def test_a_reachable_repository_passes(monkeypatch) -> None:
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, filename: "/cache/model_index.json")
    require_pretrained("org/model")


def test_the_message_is_printed_by_the_first_rank_only(monkeypatch, capsys) -> None:
    @reports_unavailable_model
    def command() -> None:
        raise ModelUnavailable("model.pretrained: org/model cannot be fetched")

    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stopped:
            command()
        assert stopped.value.code == 1
        assert (capsys.readouterr().err == "arcflow: error: model.pretrained: org/model cannot be fetched\n") is printed


def test_a_local_folder_without_transformer_is_named(tmp_path) -> None:
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ModelUnavailable, match=rf"model.pretrained: local folder {tmp_path} has no "
                                               r"transformer/config.json"):
        require_pretrained(tmp_path, subfolder="transformer")
    require_pretrained(tmp_path)  # a text encoder's folder needs no transformer/
