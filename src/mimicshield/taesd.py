"""A tiny autoencoder (TAESD family) that loads the trained TAEF2 weights (FLUX.2 latent space).

Why: the tests and demos need a *real, trained* image encoder that runs on the CPU in milliseconds,
so encoder-targeted attacks, latent-distance metrics and encode->decode "purification" can be
checked against actual learned features instead of random weights.

Architecture (inferred from the state_dict keys and shapes of ``taef2_{encoder,decoder}.pth`` and
checked by the round-trip PSNR; every conv is 3x3 with padding 1 unless noted, width 64)::

    Block(x)     = ReLU(conv(x) + skip(x))
                   conv = Conv-ReLU-Conv-ReLU-Conv, skip = identity (1x1 conv if widths differ)
    PoolBlock(x) = Block(x + pool(x))
                   pool = Conv1x1(64->256, no bias) - GroupNorm(4, 256) - ReLU - Conv1x1(256->64,
                   no bias). GroupNorm's statistics span the whole feature map, so this
                   branch is how the low-resolution "midblocks" see global image context.

    encoder (RGB in [0, 1] -> 32 x H/8 x W/8):
        0 conv(3->64), 1 Block,
        2 conv stride 2 (no bias), 3-5 Block x3,
        6 conv stride 2 (no bias), 7-9 Block x3,
        10 conv stride 2 (no bias), 11-13 PoolBlock x3,
        14 conv(64->32)

    decoder (32 x h x w -> RGB in about [0, 1], 8h x 8w):
        0 Clamp: 3 * tanh(z / 3), 1 conv(32->64), 2 ReLU, 3-5 PoolBlock x3,
        6 Upsample x2 (nearest), 7 conv (no bias), 8-10 Block x3,
        11 Upsample x2, 12 conv (no bias), 13-15 Block x3,
        16 Upsample x2, 17 conv (no bias), 18 Block, 19 conv(64->3)

The sequential indices above are exactly the state_dict prefixes, so the files load with
``strict=True``. The latents are used as they come (std about 0.85 on the astronaut photo); there is
no extra scaling factor. Receptive field: the GroupNorm branch makes outputs depend on the whole
image, so unlike the original TAESD the results are not exactly tile-separable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "LATENT_CHANNELS",
    "SCALE_FACTOR",
    "TinyAutoencoder",
    "TinyAutoencoderLatents",
    "load_taef2",
]

LATENT_CHANNELS = 32
SCALE_FACTOR = 8
WIDTH = 64
POOL_EXPANSION = 4
POOL_GROUPS = 4  # 64 channels per group; the only count that gives ~31 dB on the 512 px astronaut
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3), so out-of-range latents decode gracefully."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual conv block; ``pool=True`` first adds a GroupNorm channel-MLP for global context."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if pool:
            hidden = POOL_EXPANSION * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, hidden, 1, bias=False),
                nn.GroupNorm(POOL_GROUPS, hidden),
                nn.ReLU(),
                nn.Conv2d(hidden, n_in, 1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """RGB in [0, 1] -> latent at 1/8 resolution (see the module docstring for the layout)."""
    c = width
    return nn.Sequential(
        _conv(3, c),
        Block(c, c),
        _conv(c, c, stride=2, bias=False),
        *(Block(c, c) for _ in range(3)),
        _conv(c, c, stride=2, bias=False),
        *(Block(c, c) for _ in range(3)),
        _conv(c, c, stride=2, bias=False),
        *(Block(c, c, pool=True) for _ in range(3)),
        _conv(c, latent_channels),
    )


def make_decoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """Latent -> RGB in about [0, 1] at 8x resolution (see the module docstring for the layout)."""
    c = width
    return nn.Sequential(
        Clamp(),
        _conv(latent_channels, c),
        nn.ReLU(),
        *(Block(c, c, pool=True) for _ in range(3)),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        *(Block(c, c) for _ in range(3)),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        *(Block(c, c) for _ in range(3)),
        nn.Upsample(scale_factor=2),
        _conv(c, c, bias=False),
        Block(c, c),
        _conv(c, 3),
    )


class TinyAutoencoder(nn.Module):
    """TAESD-style encoder/decoder pair; images in [0, 1], latents 32 x H/8 x W/8."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = make_encoder(latent_channels)
        self.decoder = make_decoder(latent_channels)

    def encode(self, x01: Tensor) -> Tensor:
        """Latent of an image batch (N, 3, H, W) in [0, 1]; H and W should be multiples of 8."""
        return self.encoder(x01)

    def decode(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Image in [0, 1] from a latent; ``clamp=False`` keeps gradients outside that range."""
        x = self.decoder(z)
        return x.clamp(0, 1) if clamp else x

    def forward(self, x01: Tensor) -> Tensor:
        """encode -> decode round trip, the "purification" a mimic would apply."""
        return self.decode(self.encode(x01))


class TaefWeightsError(ValueError):
    """A TAEF2 weights file that is not one: the message names the file, in one line."""


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"TAEF2 weights not found: {path}. Pass the folder that holds {ENCODER_FILE} and "
            f"{DECODER_FILE} (the taef2_*.pth files from madebyollin/taesd)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch all raise their own kinds
        raise TaefWeightsError(
            f"{path}: not a TAEF2 weights file (torch.load: {type(error).__name__}: "
            f"{_first_line(error)}); "
            "re-download the taef2_*.pth files from madebyollin/taesd."
        ) from error
    if not isinstance(state, dict):
        raise TaefWeightsError(f"{path}: not a TAEF2 weights file (no state dict in it).")
    return state


def _load_into(module: nn.Module, path: Path) -> None:
    """Load ``path`` strictly into ``module``; a mismatch is one line naming the file and
    a tensor that differs (torch's own message spans many lines)."""
    state = _load_state_dict(path)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    found = {key: tuple(getattr(value, "shape", ())) for key, value in state.items()}
    problems = (
        ("lacks", sorted(expected.keys() - found.keys())),
        (
            "has misshapen",
            sorted(k for k in expected.keys() & found.keys() if found[k] != expected[k]),
        ),
        ("has extra", sorted(found.keys() - expected.keys())),
    )
    for problem, keys in problems:
        if keys:
            raise TaefWeightsError(
                f"{path}: not the TAEF2 {path.stem.removeprefix('taef2_')} weights: it {problem} "
                f"tensor(s) such as {keys[0]!r} ({len(keys)} in all); re-download the "
                "taef2_*.pth files from madebyollin/taesd."
            )
    module.load_state_dict(state, strict=True)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_taef2(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyAutoencoder:
    """Build a :class:`TinyAutoencoder`, load the fp16 TAEF2 state_dicts strictly, set eval mode."""
    weights_dir = Path(weights_dir)
    model = TinyAutoencoder()
    _load_into(model.encoder, weights_dir / ENCODER_FILE)
    _load_into(model.decoder, weights_dir / DECODER_FILE)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TinyAutoencoderLatents:
    """The small latent interface the protection engine uses for SD VAEs, backed by TAEF2.

    Why: lets encoder-targeted methods (which only call ``encode``) run against a real trained
    encoder on the CPU. The encoder is deterministic, so ``posterior_noise`` is ignored.
    """

    def __init__(self, autoencoder: TinyAutoencoder) -> None:
        self.autoencoder = autoencoder
        param = next(autoencoder.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype

    @classmethod
    def from_dir(
        cls,
        weights_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TinyAutoencoderLatents:
        return cls(load_taef2(weights_dir, device=device, dtype=dtype))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of E(x) for an image of ``height`` x ``width`` pixels."""
        return (self.autoencoder.latent_channels, height // SCALE_FACTOR, width // SCALE_FACTOR)

    def encode(self, x: Tensor, posterior_noise: Tensor | None = None) -> Tensor:
        """E(x) for ``x`` in [-1, 1]; fp32 result, gradients flow back to ``x``."""
        del posterior_noise  # deterministic encoder: there is no posterior to sample
        x01 = (x.to(device=self.device, dtype=self.dtype) + 1) / 2
        return self.autoencoder.encode(x01).float()

    def decode(self, z: Tensor) -> Tensor:
        """Image in [-1, 1] from a latent, matching ``encode``'s pixel convention."""
        x01 = self.autoencoder.decode(z.to(device=self.device, dtype=self.dtype))
        return (x01 * 2 - 1).float()
