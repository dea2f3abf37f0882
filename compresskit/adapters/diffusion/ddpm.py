"""Gaussian diffusion for class-conditional image models: noising, the DDPM loss, sampling, calibration inputs.

What DPQ needs from a diffusion model, written once for every model of the family (DiT, U-Net):

* the forward process ``q_sample`` on the linear beta schedule of DDPM / ADM / DiT (1000 steps,
  ``beta`` from 1e-4 to 0.02);
* the DDPM training loss (Ho et al. 2020, "simple" loss): the mean squared error between the noise
  and the model's epsilon prediction at uniformly drawn timesteps. DPQ's M-step trains codebooks
  on exactly this loss. A model with learned sigma outputs ``2C`` channels (epsilon, then the
  variance interpolation of Nichol & Dhariwal); the loss reads the first ``C`` and adds nothing
  else: no variational-bound term trains the variance channels;
* class dropout (labels replaced by the null class with probability 0.1, as DiT trains and DPQ
  fine-tunes), so the model stays usable without a label for classifier-free guidance;
* ancestral DDPM sampling on a respaced schedule (ADM: a subsequence of the 1000 timesteps, with
  the betas that make its cumulative alphas those of the full schedule), 50 / 100 / 250 steps, with
  classifier-free guidance on the epsilon channels only (scale 1.5 by default), from fixed seeds;
* calibration inputs: zero-data noise batches (VQ4DiT: random classes, Gaussian images at random
  timesteps) and the states of a sampling run of the uncompressed model (a teacher trajectory,
  for block-output calibration on the inputs the blocks really see when sampling).

The model interface is any callable ``model(x, t, y) -> out``:

* ``x``: float ``[B, C, H, W]`` (``x_t``, images in [-1, 1] plus noise);
* ``t``: long ``[B]``, timesteps of the full 1000-step schedule (respaced sampling passes the
  original timestep, never the index in the subsequence);
* ``y``: long ``[B]``, class ids; the null (unconditional) class id is chosen by the caller (DiT
  uses ``num_classes``);
* ``out``: float ``[B, C, H, W]`` (epsilon) or ``[B, 2C, H, W]`` (epsilon, then variance values in
  [-1, 1]).

Schedules are computed in float64 and applied in the images' dtype. Everything random takes a
seed or a ``torch.Generator``: the same seed gives the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from compresskit.errors import CompressKitError

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Batch = dict[str, torch.Tensor]  # {"x": [B, C, H, W] float, "t": [B] long, "y": [B] long}

NUM_TIMESTEPS = 1000
SAMPLING_STEPS = (50, 100, 250)  # DPQ's evaluation settings
CFG_SCALE = 1.5  # DPQ's default guidance scale
CLASS_DROPOUT = 0.1  # DiT's training and DPQ's fine-tuning label-drop probability
VARIANCES = ("fixed_small", "fixed_large", "learned")


@dataclass(frozen=True)
class GaussianDiffusion:
    """A discrete diffusion schedule: ``betas`` (float64 ``[S]``) and, for a respaced one, the original
    timestep of each of its steps (``timesteps``, long ``[S]``; ``arange(S)`` for a full schedule).

    Build it with :meth:`linear` and :meth:`respaced`; the derived tensors are properties (cheap).
    """

    betas: torch.Tensor  # [S] float64
    timesteps: torch.Tensor  # [S] long: the model's t for each step

    @classmethod
    def linear(cls, num_timesteps: int = NUM_TIMESTEPS) -> "GaussianDiffusion":
        """The linear schedule of DDPM / ADM / DiT: betas from 1e-4 to 0.02 for 1000 steps (scaled by
        ``1000 / num_timesteps`` for other lengths, as ADM does)."""
        if num_timesteps < 2:
            raise CompressKitError(f"a diffusion schedule needs at least 2 timesteps, got {num_timesteps}")
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        return cls(betas, torch.arange(num_timesteps))

    @property
    def num_steps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> torch.Tensor:  # [S] float64: abar_s
        return torch.cumprod(1.0 - self.betas, 0)

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """``steps`` evenly spaced timesteps of this schedule (the first and the last included, rounded
        as ADM's ``space_timesteps``), with betas ``1 - abar_k / abar_prev`` so the respaced process
        has the same cumulative alphas at the kept timesteps."""
        n = self.num_steps
        if not 1 <= steps <= n:
            raise CompressKitError(f"respacing needs 1 <= steps <= {n}, got {steps}")
        stride = (n - 1) / (steps - 1) if steps > 1 else 1
        keep = sorted({round(i * stride) for i in range(steps)})
        keep_t = torch.tensor(keep)
        abar = self.alphas_cumprod[keep_t]  # [steps]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / prev, self.timesteps[keep_t])

    # ---- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``t`` long ``[B]`` indexes this schedule's
        steps; ``x0`` and ``noise`` are ``[B, ...]``; returns ``x0``'s shape and dtype."""
        abar = self.alphas_cumprod[t.cpu()]
        return _bcast(abar.sqrt(), x0) * x0 + _bcast((1 - abar).sqrt(), x0) * noise

    def random_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` steps drawn uniformly from ``[0, num_steps)``: long ``[n]``."""
        return torch.randint(0, self.num_steps, (n,), generator=generator)

    # ---- loss -----------------------------------------------------------------------------------
    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        y: torch.Tensor,
        *,
        null_class: int,
        generator: torch.Generator,
        class_dropout: float = CLASS_DROPOUT,
    ) -> torch.Tensor:
        """The DDPM training loss on clean images ``x0`` (float ``[B, C, H, W]``) of classes ``y`` (long
        ``[B]``): timesteps uniform, fresh Gaussian noise, labels dropped to ``null_class`` with
        probability ``class_dropout``, then :func:`eps_mse`. Scalar float tensor, differentiable."""
        t = self.random_timesteps(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        y = drop_labels(y, null_class, class_dropout, generator)
        x_t = self.q_sample(x0, t, noise)
        return eps_mse(model(x_t, self.timesteps[t].to(x0.device), y.to(x0.device)), noise)

    # ---- reverse process ------------------------------------------------------------------------
    def p_mean_logvar(
        self, out: torch.Tensor, x_t: torch.Tensor, i: int, variance: str, clip_denoised: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``p(x_{i-1} | x_i)`` for step ``i`` of this schedule, from the model's
        (guided) output ``out`` ``[B, C or 2C, H, W]`` at ``x_t`` ``[B, C, H, W]``.

        ``variance``: ``fixed_small`` (the posterior variance, best for few steps), ``fixed_large``
        (``beta``, DDPM's other choice) or ``learned`` (ADM's interpolation between the two logs,
        read from the ``2C`` output's second half). Log-variance is a float scalar tensor except for
        ``learned`` (``[B, C, H, W]``).
        """
        c = x_t.shape[1]
        eps = out[:, :c]
        abar = self.alphas_cumprod
        a_t = abar[i]
        a_prev = abar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = self.betas[i]
        post_var = beta * (1 - a_prev) / (1 - a_t)
        # log of the posterior variance, with step 0's (which is 0) replaced by step 1's, as ADM clips it
        post_var_clip = self.betas[1] * (1 - abar[0]) / (1 - abar[1]) if i == 0 else post_var
        if variance == "fixed_small":
            logvar = post_var_clip.log().to(x_t)
        elif variance == "fixed_large":
            logvar = (post_var_clip if i == 0 else beta).log().to(x_t)
        elif variance == "learned":
            if out.shape[1] != 2 * c:
                raise CompressKitError(f"variance 'learned' needs a model with 2C = {2 * c} output channels, got {out.shape[1]}; use 'fixed_small'")
            frac = (out[:, c:] + 1) / 2
            logvar = frac * beta.log().to(x_t) + (1 - frac) * post_var_clip.log().to(x_t)
        else:
            raise CompressKitError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
        x0 = (x_t - (1 - a_t).sqrt().to(x_t) * eps) / a_t.sqrt().to(x_t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        coef_x0 = (beta * a_prev.sqrt() / (1 - a_t)).to(x_t)
        coef_xt = ((1 - a_prev) * (1 - beta).sqrt() / (1 - a_t)).to(x_t)
        return coef_x0 * x0 + coef_xt * x_t, logvar

    @torch.no_grad()
    def sample_states(
        self,
        model: Model,
        y: torch.Tensor,
        image_shape: tuple[int, int, int],
        *,
        null_class: int,
        cfg_scale: float = CFG_SCALE,
        seed: int = 0,
        variance: str = "fixed_small",
        clip_denoised: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Ancestral DDPM sampling over this schedule's steps, from the last to the first, yielding
        ``(x_t, t)`` before each model call (``x_t`` float ``[B, C, H, W]``, ``t`` long ``[B]`` the
        original timesteps), then ``(x_0, -1)`` last.

        ``y``: long ``[B]`` classes (``null_class`` for unconditional samples); ``cfg_scale`` 1 means no
        guidance (one model call per step, the conditional one). The start noise and every step's
        noise come from one generator seeded with ``seed`` (on the CPU, so results do not depend on
        the device). ``variance`` and ``clip_denoised`` as in :meth:`p_mean_logvar`.
        """
        gen = torch.Generator().manual_seed(seed)
        device = y.device
        x = torch.randn((y.shape[0], *image_shape), generator=gen).to(device)
        for i in reversed(range(self.num_steps)):
            t = self.timesteps[i].expand(y.shape[0]).to(device)
            yield x, t
            out = guided_output(model, x, t, y, null_class=null_class, scale=cfg_scale)
            mean, logvar = self.p_mean_logvar(out, x, i, variance, clip_denoised)
            noise = torch.randn(x.shape, generator=gen).to(x)
            x = mean + (torch.exp(0.5 * logvar) * noise if i > 0 else 0)  # no noise on the last step
        yield x, torch.full_like(y, -1)

    def sample(self, model: Model, y: torch.Tensor, image_shape: tuple[int, int, int], **kwargs) -> torch.Tensor:
        """Images sampled for classes ``y`` (long ``[B]``): float ``[B, C, H, W]`` (in [-1, 1] with
        ``clip_denoised``). Keyword arguments as in :meth:`sample_states`; use a schedule from
        :meth:`respaced` for 50 / 100 / 250 steps."""
        for x, _ in self.sample_states(model, y, image_shape, **kwargs):
            pass
        return x


# ---- pieces on plain tensors -----------------------------------------------------------------------
def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]`` -> ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
    return v.to(like).reshape(-1, *([1] * (like.dim() - 1)))


def eps_mse(out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the epsilon channels of ``out`` (``[B, C or 2C, H, W]``: the first
    ``C``) and ``noise`` (``[B, C, H, W]``); the variance channels of a ``2C`` output are ignored."""
    c = noise.shape[1]
    if out.shape[1] not in (c, 2 * c) or out.shape[0] != noise.shape[0] or out.shape[2:] != noise.shape[2:]:
        raise CompressKitError(
            f"the model's output {tuple(out.shape)} should be [B, C or 2C, H, W] for images {tuple(noise.shape)}; "
            "check the model's channel count (learned sigma doubles it)"
        )
    return torch.mean((out[:, :c].float() - noise.float()) ** 2)


def drop_labels(y: torch.Tensor, null_class: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """``y`` (long ``[B]``) with each label replaced by ``null_class`` with probability ``p`` (one uniform
    draw per label from ``generator``); a new tensor."""
    if not 0 <= p <= 1:
        raise CompressKitError(f"class dropout must be a probability in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator) < p
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


def guided_output(model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, null_class: int, scale: float = CFG_SCALE) -> torch.Tensor:
    """The model's output with classifier-free guidance on its epsilon channels only.

    ``eps = eps(x, y_null) + scale * (eps(x, y) - eps(x, y_null))`` on the first ``C`` channels; the
    variance channels of a ``2C`` output are the conditional call's, unchanged. Both calls are one
    model call on a doubled batch (as DiT does); ``scale == 1`` makes only the conditional call.
    Shapes as the model interface: ``x`` ``[B, C, H, W]``, ``t`` and ``y`` long ``[B]``, returns
    ``[B, C or 2C, H, W]``.
    """
    if scale == 1:
        return model(x, t, y)
    b, c = x.shape[:2]
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out[:b], out[b:]
    eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([eps, cond[:, c:]], dim=1)


# ---- calibration inputs ----------------------------------------------------------------------------
def noise_batches(
    n_samples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    null_class: int,
    seed: int = 0,
    class_dropout: float = CLASS_DROPOUT,
    num_timesteps: int = NUM_TIMESTEPS,
) -> list[Batch]:
    """Zero-data calibration inputs (VQ4DiT): ``n_samples`` model-call kwargs of one sample each,
    ``x`` standard Gaussian float32 ``[1, C, H, W]``, ``t`` uniform in ``[0, num_timesteps)``, ``y`` a
    uniform class, dropped to ``null_class`` with probability ``class_dropout`` (as in training, so
    the unconditional branch that guidance calls is calibrated too). Same seed, same batches."""
    if n_samples < 1 or num_classes < 1:
        raise CompressKitError(f"noise batches need n_samples >= 1 and num_classes >= 1, got {n_samples}, {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_samples, *image_shape), generator=gen)
    t = torch.randint(0, num_timesteps, (n_samples,), generator=gen)
    y = drop_labels(torch.randint(0, num_classes, (n_samples,), generator=gen), null_class, class_dropout, gen)
    return [{"x": x[i : i + 1], "t": t[i : i + 1], "y": y[i : i + 1]} for i in range(n_samples)]


def trajectory_batches(
    model: Model,
    diffusion: GaussianDiffusion,
    n_samples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    null_class: int,
    n_runs: int = 4,
    seed: int = 0,
    **sample_kwargs,
) -> list[Batch]:
    """States ``x_t`` along sampling runs of the (uncompressed) ``model``, as ``n_samples`` model-call
    kwargs of one sample each: the inputs the blocks see when the model samples, for block-output
    calibration.

    ``n_runs`` images of random classes (seeded) are sampled over ``diffusion`` (a respaced schedule,
    e.g. ``GaussianDiffusion.linear().respaced(50)``); from the ``n_runs * steps`` states
    ``n_samples`` are taken evenly along time and across runs. Each batch has ``x`` float32
    ``[1, C, H, W]``, ``t`` long ``[1]`` (original timestep), ``y`` long ``[1]`` (the run's class).
    ``sample_kwargs`` go to :meth:`GaussianDiffusion.sample_states` (``cfg_scale``, ``variance``...).
    """
    total = n_runs * diffusion.num_steps
    if not 1 <= n_samples <= total:
        raise CompressKitError(
            f"a trajectory of {n_runs} runs x {diffusion.num_steps} steps has {total} states; ask for 1..{total} samples or more runs"
        )
    y = torch.randint(0, num_classes, (n_runs,), generator=torch.Generator().manual_seed(seed))
    states = [
        (x.clone(), t) for x, t in diffusion.sample_states(model, y, image_shape, null_class=null_class, seed=seed, **sample_kwargs)
    ][:-1]  # [steps] of ([n_runs, C, H, W], [n_runs]); the final x_0 is no model input
    picks = torch.linspace(0, total - 1, n_samples).round().long().tolist()  # flat index: step-major
    out = []
    for k in picks:
        x, t = states[k // n_runs]
        r = k % n_runs
        out.append({"x": x[r : r + 1].float(), "t": t[r : r + 1], "y": y[r : r + 1]})
    return out


def batch_loss(model: Model, batch: Batch) -> torch.Tensor:
    """The DDPM loss on one calibration batch ``{"x": x_t, "t", "y", "noise"}`` (each ``[B, ...]``):
    :func:`eps_mse` of ``model(x, t, y)`` against the noise ``x_t`` was made with. Exact and
    stateless: the batch carries its own noise, so regrouped batches (``torch.cat``) keep their loss."""
    if "noise" not in batch:
        raise CompressKitError(
            "a DDPM calibration batch needs the noise its x_t was made with ('noise', [B, C, H, W]); "
            "draw batches with the adapter's calibration_batches, or add it to your own"
        )
    return eps_mse(model(batch["x"], batch["t"], batch["y"]), batch["noise"])
