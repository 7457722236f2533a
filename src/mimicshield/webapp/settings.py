"""The settings of one job: every option of ``mimicshield protect``, checked as the CLI checks them.

The page submits text boxes and numbers; :class:`ProtectSettings` turns them into the values
the CLI would have parsed, refuses what the CLI refuses (with its messages), and builds the
protector and output options of a job.
"""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..defaults import DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_TILE_SIZE, DEFAULT_WORK_SIZE
from ..methods import get_method
from ..protector import CATEGORY_PROMPTS, DEFAULT_PROMPT, MAX_SEED
from ..resolution import parse_work_size


def split_values(text: str | None, separators: str = "\n") -> tuple[str, ...]:
    """``"a\nb"`` -> ("a", "b"): several values typed in one box (one model per line)."""
    if not text:
        return ()
    return tuple(v.strip() for v in re.split(f"[{separators}]", text) if v.strip())


def per_model(
    values: str | Sequence[str | None] | None, count: int, what: str, separators: str = "\n"
) -> tuple[str | None, ...]:
    """One value per model, as ``mimicshield protect`` takes them: none, or one each in order;
    ``auto`` (or None) means "not given" at its position."""
    if values is None or isinstance(values, str):
        values = split_values(values, separators)
    values = tuple("auto" if v is None else str(v).strip() for v in values)
    if all(v.lower() == "auto" for v in values):  # none given, at any position
        return (None,) * count
    if len(values) != count:
        raise ValueError(
            f"{what}: give one value per model ({count}, 'auto' for the default); "
            f"got {len(values)}."
        )
    return tuple(None if v.lower() == "auto" else v for v in values)


def _clip_skips(values: int | Sequence[int], count: int) -> tuple[int, ...]:
    """One clip skip per model: one value stands for every model, several go one each."""
    from ..models import check_clip_skip

    values = (values,) * count if isinstance(values, int) else tuple(values)
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise ValueError(f"Clip skip: give one value per model ({count}); got {len(values)}.")
    for value in values:
        check_clip_skip(value)
    return values


@dataclass(frozen=True)
class ProtectSettings:
    """Every option of ``mimicshield protect``, with its defaults, as the page submits them.

    ``eps`` and ``step_size`` are in 1/255 units, as on the command line. Several models make an
    ensemble; ``model_config`` and ``family`` then hold one value per model, ``clip_skip`` one
    per model or one for all (``mimicshield ui --clip-skip``, which the page keeps).
    ``work_size`` None is the CLI's default (measured, raised to the models' own size).
    ``overwrite`` has no counterpart: every job writes into a fresh folder.
    """

    # text typed in the page (one value per line) is split into tuples in __post_init__
    model: tuple[str, ...] | str = (DEFAULT_MODEL,)
    model_weight: tuple[float, ...] | None = None
    model_config: tuple[str | None, ...] | str | None = None
    family: tuple[str | None, ...] | str | None = None
    clip_skip: tuple[int, ...] | int = 1
    device: str = "auto"
    dtype: str = "auto"
    method: str = DEFAULT_METHOD
    eps: float = 16
    steps: int = 100
    step_size: float = 1
    prompt: str | None = None
    category: str | None = None
    target: str | None = None  # an uploaded image path (photoguard, mist, sdst-)
    seed: int = 0
    batch_size: int = 0  # 0: as many as the card holds (``--batch-size auto``)
    posterior: str = "sample"
    sdst_r: float = 5.0
    robust: tuple[str, ...] = ()
    low_memory: bool = False
    compile_networks: bool = False
    cuda_graphs: bool = False
    nondeterministic: bool = False
    work_size: str | None = None
    tile_size: int = DEFAULT_TILE_SIZE
    file_format: str = "png"
    quality: int = 95
    metadata: bool = True
    strip_metadata: bool = False

    def __post_init__(self) -> None:
        """The checks ``mimicshield protect`` makes, with the same messages where they apply."""
        from ..families import FAMILIES

        if isinstance(self.model, str):
            object.__setattr__(self, "model", split_values(self.model))
        if not self.model:
            raise ValueError("Give a model: a hub id, a local folder or a .safetensors file.")
        count = len(self.model)
        configs = per_model(self.model_config, count, "Model config")
        families = per_model(self.family, count, "Family", "\n, ")
        object.__setattr__(self, "model_config", configs)
        object.__setattr__(self, "family", families)
        for name in families:
            if name is not None and name not in FAMILIES:
                raise ValueError(f"Family must be auto, {', '.join(FAMILIES)}; got {name!r}.")
        object.__setattr__(self, "clip_skip", _clip_skips(self.clip_skip, count))
        if self.model_weight is not None:
            weights = tuple(float(w) for w in self.model_weight)
            if len(weights) != count or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(
                    f"Model weights: give one positive weight per model ({count}); got "
                    f"{list(weights)}."
                )
            object.__setattr__(self, "model_weight", weights)
        method = get_method(self.method)
        if self.prompt and self.category:
            raise ValueError("Give a prompt or a category, not both.")
        if self.category and self.category not in CATEGORY_PROMPTS:
            raise ValueError(f"Unknown category {self.category!r}.")
        if self.target and not method.needs_target:
            raise ValueError(
                f"A target image is only used by photoguard, mist and sdst-, not {self.method}."
            )
        if not 1 <= self.eps <= 255:
            raise ValueError(f"ε must be between 1 and 255 (in 1/255 units); got {self.eps:g}.")
        if not 0 < self.step_size <= 255:
            raise ValueError(f"α must be in (0, 255] (in 1/255 units); got {self.step_size:g}.")
        if self.cuda_graphs and (self.compile_networks or self.low_memory):
            raise ValueError(
                "CUDA graphs do not combine with torch.compile or low memory; choose one."
            )
        if self.steps < 1:
            raise ValueError(f"Steps must be at least 1; got {self.steps}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"The seed must be between 0 and {MAX_SEED}; got {self.seed}.")
        if self.batch_size < 0:
            raise ValueError("The batch size must be at least 0 (0: automatic).")
        if self.tile_size < 64:
            raise ValueError(f"The tile size must be at least 64; got {self.tile_size}.")
        if self.file_format not in ("png", "jpeg"):
            raise ValueError(f"The format must be png or jpeg; got {self.file_format!r}.")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100; got {self.quality}.")
        if self.posterior not in ("sample", "mean"):
            raise ValueError(f"The posterior must be sample or mean; got {self.posterior!r}.")
        try:
            parse_work_size(self.work_size or "native")
        except ValueError as error:
            raise ValueError(f"Work size: {error}") from None

    @property
    def chosen_prompt(self) -> str:
        if self.category:
            return CATEGORY_PROMPTS[self.category]
        return self.prompt or DEFAULT_PROMPT

    @property
    def model_key(self) -> tuple:
        """What makes loaded weights reusable: the performance options change them in place.
        Not the clip skip: it only says which layer prompts are read from, and the service
        reuses loaded models at another (``models.at_clip_skip``)."""
        return (
            self.model,
            self.model_config,
            self.family,
            self.device,
            self.dtype,
            self.low_memory,
            self.compile_networks,
        )

    def output_options(self, native_sizes: Iterable[int | None] = ()):
        """The CLI's output options; the default work size is raised to the models' size."""
        from ..families import default_work_size
        from ..runner import OutputOptions

        if self.work_size:
            work_size = parse_work_size(self.work_size)
        else:
            work_size = default_work_size(DEFAULT_WORK_SIZE, native_sizes)
        return OutputOptions(
            work_size=work_size,
            tile_size=self.tile_size,
            file_format=self.file_format,
            quality=self.quality,
            provenance=self.metadata,
            strip_metadata=self.strip_metadata,
        )

    def protector(self, engine, target: Tensor | None = None):
        from ..protector import Protector

        return Protector(
            engine,
            self.method,
            target=target,
            eps=self.eps / 255,
            step_size=self.step_size / 255,
            steps=self.steps,
            prompt=self.chosen_prompt,
            posterior=self.posterior,
            r=self.sdst_r,
            seed=self.seed,
            robust=self.robust,
            cuda_graphs=self.cuda_graphs,
            deterministic=not self.nondeterministic,
        )
