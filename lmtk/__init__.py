"""lmtk: turn FSDP training checkpoints into complete HuggingFace model folders."""

__version__ = "0.1.0"
