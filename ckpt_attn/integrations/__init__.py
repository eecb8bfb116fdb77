"""Optional bridges to other libraries; each is imported only when used.

    ckpt_attn.integrations.transformers   Hugging Face transformers: register() makes
                                          attn_implementation="ckpt_attn" run ckpt_attn's op
                                          (needs the `hf` extra: pip install "ckpt-attn[hf]")
"""
