"""bitsandbytes' test helpers read this flag to leave out ROCm-only cases; fourbit has no ROCm build."""

HIP_ENVIRONMENT = False
