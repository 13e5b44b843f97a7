"""The presets of advdit (``--config NAME``), shipped as package data; see docs/configs.md."""
