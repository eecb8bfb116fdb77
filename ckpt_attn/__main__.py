"""python -m ckpt_attn: the ckpt-attn command line (see ckpt_attn.cli)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
