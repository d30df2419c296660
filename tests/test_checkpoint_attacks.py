"""Fault injection: crafted checkpoint files that try to run code on load must be refused, running nothing."""

import io
import pickle
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from arcflow.distributed import DistEnv
from arcflow.training import checkpoint as ckpt


def _tensors() -> dict:
    return {"model": {"w": torch.ones(3, 2)}, "ema": {"w": torch.full((3, 2), 2.0)}}


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + struct.pack("<B", len(raw)) + raw  # SHORT_BINUNICODE


def dotted_call(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s attribute path ``name`` (e.g. 'os.system') on ``argument``."""
    return (b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93"  # STACK_GLOBAL
            + _unicode(argument) + b"\x85" + b"R" + b".")  # TUPLE1, REDUCE, STOP


class _TouchFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_dotted_path_through_an_allowed_module_is_refused(tmp_path):
    """The old allow-list accepted any name under torch.distributed.checkpoint.*: 'os.system' reached a shell."""
    path = ckpt.save_checkpoint(tmp_path, 1, _tensors(), {}, DistEnv())
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(dotted_call("torch.distributed.checkpoint.filesystem", "os.system",
                                                 f"touch {marker}"))
    ckpt.write_checksums(path)  # an attacker rewrites the checksums too
    with pytest.raises(ValueError, match="refusing to load 'torch.distributed.checkpoint.filesystem.os.system'"):
        ckpt.load_checkpoint(path, _tensors())
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bytes_entry_is_refused_before_torch_load(tmp_path):
    """A harmless index may declare a bytes entry; torch's default planner would torch.load it unsafely."""
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_TouchFile(marker), payload)
    folder = tmp_path / "iter_0000001"
    dcp.save({"model": {"w": io.BytesIO(payload.getvalue())}, "ema": {"w": torch.zeros(3, 2)}},
             checkpoint_id=str(folder))
    (folder / ckpt.STATE_FILE).write_text('{"iteration": 1}')
    ckpt.write_checksums(folder)
    with pytest.raises(ValueError, match="entry 'model.w' is a BytesStorageMetadata, not a tensor"):
        ckpt.load_checkpoint(folder, _tensors())
    assert not marker.exists()


def test_planner_cannot_unpickle():
    planner = ckpt._TensorsOnlyPlanner()
    item = type("Item", (), {"dest_index": type("Index", (), {"fqn": "model.w"})()})()
    payload = io.BytesIO(pickle.dumps(_TouchFile(Path("/nonexistent/never"))))
    with pytest.raises(ValueError, match="pickled bytes, not a tensor"):
        planner.load_bytes(item, payload)


def test_storage_outside_the_folder_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _tensors(), {}, DistEnv())
    metadata = ckpt.read_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    ckpt.write_checksums(path)
    with pytest.raises(ValueError, match="is not a plain file of the checkpoint folder"):
        ckpt.load_checkpoint(path, _tensors())


def test_only_requested_tensors_are_loaded(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _tensors(), {}, DistEnv())
    ema = {"w": torch.zeros(3, 2)}
    ckpt.load_checkpoint(path, {"ema": ema})
    assert torch.equal(ema["w"], torch.full((3, 2), 2.0))
    with pytest.raises(ValueError, match="lacks 1 tensor.*'ema.v'"):
        ckpt.load_checkpoint(path, {"ema": {"w": torch.zeros(3, 2), "v": torch.zeros(1)}})
