"""MixGRPO's hybrid sampling at inference and evaluation (``--base-after-step K``): the trained transformer for the
first K sampling steps, the base model for the rest -- the published defence against reward hacking that keeps
the trained model where it learned (the high-noise steps) and the base's detail after.

With a LoRA (``--lora``) the switch is the adapters turned off: no second model. With a trained transformer
(``--transformer``) the base pipeline's own transformer is kept beside it: a second copy of the weights (FLUX.1-dev:
+23.8 GB in bf16). K = 0 is the base alone; K >= the steps is the trained model alone.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def hybrid(pipe, after: int | None, base_transformer=None):
    """``with hybrid(pipe, K, base) as kwargs: pipe(..., **kwargs)``: the pipeline call's ``callback_on_step_end``
    that switches to the base once K steps are done (``base_transformer``: the base's transformer; None: the pipeline
    carries a LoRA, which is disabled). Leaving restores the trained model for the next call. ``after`` None: no
    switch, no callback."""
    if after is None:
        yield {}
        return
    trained = pipe.transformer

    def to_base():
        if base_transformer is None:
            pipe.disable_lora()
        else:
            pipe.transformer = base_transformer

    def callback(pipeline, step, timestep, tensors):
        if step == after - 1:  # called after step `step` (0-based): K steps done
            to_base()
        return tensors

    if after == 0:
        to_base()
    try:
        yield {"callback_on_step_end": callback}
    finally:
        if base_transformer is None:
            pipe.enable_lora()
        else:
            pipe.transformer = trained
