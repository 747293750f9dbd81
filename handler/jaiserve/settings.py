"""Deployment settings: the ``handler:`` block of model-config.yaml, read by the TorchServe handler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    """The ``handler:`` block of model-config.yaml. Every key is read; unknown keys are refused."""

    checkpoint: str = "ckpt.pt"  # file names inside the archive (archive.sh packs them)
    tokenizer: str = "tokenizer.json"
    n_head: int = 6  # used only when the checkpoint does not store its config
    device: str = "auto"  # auto = TorchServe's GPU when it gives one, else cpu
    dtype: str = "float32"  # or int8 (Linear layers per-channel int8, int8.py; CPU only), or bfloat16 (packed.py)
    cpu_linear: str = "onednn"  # float32 on CPU: Linear weights packed for oneDNN (jaiserve/packed.py), or aten
    threads: int = 0  # torch threads per worker; 0 = leave torch's default
    one_thread_rows: int = 0  # decode-only steps of at most this many requests run on one torch thread (0: never)
    step_budget_ms: float = 50  # continuous batching: engine steps per handle() call, then back to TorchServe
    step_ahead: bool = True  # continuous batching: the next step runs during TorchServe's round trip
    max_prefill_tokens: int = 512  # prompt and re-cropped window tokens prefilled per step: bounds a step's stall
    window_stride: int = 1  # past block_size: re-read the window once per this many tokens (1 = the seed)
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 2048  # longest prompt, in tokens
    max_choices: int = 8  # engine requests one OpenAI call may fan out to (n x prompts)
    utf8_safe_sampling: bool = True  # sampled tokens never break a UTF-8 character (jaiserve/utf8.py)
    log_prompt_chars: int = 0  # characters of the prompt in the request log (0: none, it may be personal)
    defaults: dict = field(default_factory=dict)  # request defaults: max_tokens, temperature, top_k, top_p

    @classmethod
    def from_yaml(cls, block: dict | None) -> "Settings":
        block = dict(block or {})
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown key(s) {unknown}")
        return cls(**block)
