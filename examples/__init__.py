"""The bundled example: tiny real FSDP checkpoints and the base folder they convert with."""
