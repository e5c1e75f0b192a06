"""What every config section is built on: the base `Section` (frozen, unknown keys refused, its key material),
`ConfigError`, and the name lists a typo is checked against before anything runs."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


# transformers' scheduler names (SchedulerType), listed here so a typo fails `cpt validate`, not a training child.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


# transformers' optimizer names (transformers.training_args.OptimizerNames, in its order), kept here for the same
# reason; tests/test_config.py checks the tuple against the installed library, so an upgrade that changes it fails.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
              "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
              "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")


# The largest seed every consumer accepts: numpy's legacy np.random.seed (which transformers' set_seed calls)
# takes 0 <= seed < 2**32; numpy.random.default_rng refuses negative seeds.
SEED_MAX = 2**32 - 1


def seed_field(default: int, description: str) -> Any:
    return Field(default, ge=0, le=SEED_MAX, description=f"{description} 0 to 2**32 - 1 (numpy's range).")


def name_problem(name: str) -> str | None:
    """Why `name` is not usable as one folder or file name (the rule of line names), or None when it is."""
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if "\x00" in name:
        return "it contains a NUL character"
    if name.startswith("."):
        return "it starts with '.' ('.', '..' and hidden names are refused)"
    return None


class ConfigError(ValueError):
    """A config problem, phrased with the full key path (`chunk.overlap: ...`)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    # Fields that are not part of a cache key: settings proven not to change any output (batch sizes that
    # only bound memory), and where an input sits when its content is keyed by a fingerprint (paths, model id).
    KEY_NEUTRAL: ClassVar[frozenset[str]] = frozenset()

    def key_material(self) -> dict[str, Any]:
        """What of this section enters cache keys: every field less KEY_NEUTRAL, nested sections likewise."""
        out = self.model_dump(mode="json", exclude=set(self.KEY_NEUTRAL))
        for name in out:
            value = getattr(self, name)
            if isinstance(value, Section):
                out[name] = value.key_material()
        return out
