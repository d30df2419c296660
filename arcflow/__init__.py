"""arcflow: distil text-to-image flow models into few-step ArcFlow generators."""

import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """transformers announces, on every import of diffusers, that its image processors fall back to PIL
    without torchvision. arcflow uses no image processor, so the notice only buries a run's own output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
