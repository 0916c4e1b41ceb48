from longvita.config import LongVITAConfig, VisionConfig  # noqa: F401
