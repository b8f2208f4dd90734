"""Hooks that let unmodified Hugging Face code run on fourbit.

    fourbit.integrations.transformers   `FourbitConfig` for `from_pretrained(quantization_config=...)`,
                                        `use_for_bitsandbytes_config()` for existing BitsAndBytesConfig code
    fourbit.integrations.peft           a PEFT LoRA layer for fourbit's Linear4bit (merge, save, reload)
    fourbit.integrations.bitsandbytes   `install()`: bitsandbytes' own 4-bit ops run fourbit's kernels

Each submodule imports its library (transformers, peft, bitsandbytes) when it is imported itself;
`import fourbit` imports none of them. `fourbit.FourbitConfig` is the transformers one, imported on first use.
"""
