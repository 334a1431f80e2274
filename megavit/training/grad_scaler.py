"""Loss scaling for fp16 (and optionally bf16): keep small gradients representable.

The loss is multiplied by `scale` before backward; the optimizer divides the gradients by
it, and skips the step when any gradient on any rank is inf or NaN (all ranks agree through
one all-reduce, see `megavit.training.optimizer`).

    ConstantGradScaler(scale)       --loss-scale S: the same scale every step
    DynamicGradScaler(...)          fp16 without --loss-scale (Megatron-LM's defaults):
        initial scale 2**32 (--initial-loss-scale), floor 1 (--min-loss-scale);
        after `window` (--loss-scale-window, 1000) clean steps in a row: scale x 2;
        an overflow resets that count and uses up one of `hysteresis` (--hysteresis, 2)
        allowances; when none is left the scale halves (never below the floor) — and keeps
        halving at every further overflow until a clean window restores the allowances.

bf16 trains without a scaler unless --loss-scale is given. Scalers are plain Python (no
device tensors), and their `state_dict()` goes into checkpoints.
"""

from __future__ import annotations


class ConstantGradScaler:
    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler:
    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 window: int = 1000, hysteresis: int = 2) -> None:
        if initial_scale <= 0 or min_scale <= 0 or window < 1 or hysteresis < 1:
            raise ValueError("loss scales must be positive, window and hysteresis at least 1")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.window, self.hysteresis = window, hysteresis
        self.clean_steps = 0                 # clean steps since the last growth or overflow
        self.allowances = hysteresis         # overflows left before the scale backs off

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.allowances -= 1
            if self.allowances <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.clean_steps += 1
            if self.clean_steps == self.window:
                self.clean_steps = 0
                self.allowances = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "allowances": self.allowances}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.allowances = int(state["allowances"])
