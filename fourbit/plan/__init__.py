"""fourbit.plan: the peak memory of a QLoRA run, known before the run starts."""
