"""Image metrics shared by validation during training and by ``arcflow eval``: the metric suite (FID, patch-FID,
CLIP, HPSv2, ImageReward, alignment, hooks) in ``suite.py`` and the libraries' networks in ``networks.py``.

It sits below ``training/`` and ``evaluation/`` (it needs only the config), so both can use it."""
