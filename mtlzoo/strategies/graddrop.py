r"""GradDrop (Chen et al., NeurIPS 2020): keep, element by element, the gradients of one sign at random."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlzoo.errors import ShapeMismatchError
from mtlzoo.protocol import Request, StepInputs
from mtlzoo.roles import DirectionAggregator
from mtlzoo.strategies.pcgrad import drawing, initial_stream
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_flag


class GradDrop(DirectionAggregator):
    r"""GradDrop: per feature, keep the positive or the negative task gradients, the likelier the purer.

    Paper: Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*, NeurIPS 2020
    (https://arxiv.org/abs/2010.06808), Algorithm 1, as the authors ship it (lingvo's ``GradDrop`` layer,
    ``lingvo/core/graddrop.py``, with its defaults). With ``g_k`` the gradients of the losses w.r.t. the shared
    representation ``z`` (batch first), the sign signal ``s_k = sum_b sgn(z_b) g_{k,b}`` (summed over the batch), ``U ~
    Uniform(0, 1)`` drawn once per feature and ``l_k`` the leak of task k:

    .. math::

        P = \tfrac12 \Big(1 + \frac{\sum_k s_k}{\sum_k |s_k|}\Big),\quad
        M_k = 1[s_k = 0] + 1[P \ge U]\,1[s_k > 0] + 1[P < U]\,1[s_k < 0],\quad
        t = \sum_k \big(l_k + (1 - l_k) M_k\big)\, g_k ,

    each feature's masks applied to every sample's gradients, and the result rescaled as lingvo's
    ``keep_gradnorm_constant``: ``d = t ||t|| / ||o||`` with ``o = sum_k g_k`` the gradient the
    plain sum of the losses would give (norms over the whole batch).

    On ``target="parameters"`` there is neither batch nor input: the gradients are one row per task, ``s_k = g_k`` and
    ``U`` is drawn per element. A task with a zero signal is kept, as lingvo's mask does; where every signal is 0 the
    purity is 1/2. Lingvo's ``epsilon = 1e-7`` (an absolute constant in the purity's and the rescaling's divisors, which
    makes the update depend on the gradients' scale) is left out: divisions are exact, ``0 / 0`` giving ``d = 0``.
    Worked example (issue 19): K = 2, a batch of 2, one feature, ``z = +1``, ``g_1 = (1, -3)``, ``g_2 = (1, 0)``: ``s =
    (-2, 1)``, ``P = 1/3``; with probability 1/3 ``t = (1, 0)``, else ``t = (1, -3)`` (lingvo's and LibMTL's answers).
    ``U`` comes from the strategy's own random stream (seeded from torch's or by ``seed``, saved in ``state_dict()``);
    for a fixed draw the update is permutation invariant and scales with the gradients.

    Args:
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.
        leak: ``l``: one number for every task, or K numbers in [0, 1] (1 lets a task's gradient
            through untouched; the paper's transfer-learning setting leaks the main task).
        marginalize_batch: lingvo's ``marginalize_batch_dim``: one purity and one ``U`` per feature
            from the batch-summed signal; ``False``, one per (sample, feature) (torchjd 0.18's variant).
        input_sign: lingvo's ``use_input_sign_only``: the signal is the gradient times ``sgn(z)`` of
            the training forward (the paper's line 4, LibMTL too); ``False``, the gradient itself.
        rescale_norm: lingvo's ``keep_gradnorm_constant``: the rescaling ``t ||t|| / ||o||`` its code computes (which
            does not keep the norm constant, as its description says); ``False``, ``d = t`` (LibMTL).
        seed: Seed of ``U``; ``None`` draws one from torch's generator.

    Example:
        >>> import torch, mtlzoo
        >>> graddrop = mtlzoo.create("graddrop", num_tasks=2, target="parameters", rescale_norm=False)
        >>> graddrop.aggregate(torch.tensor([[2.0, 1.0], [3.0, -1.0]]), torch.ones(2))[0]
        tensor(5.)
    """

    info = StrategyInfo(
        name="graddrop",
        summary="Per feature, keeps the positive or the negative task gradients at random, by sign purity.",
        request=Request("representation", "gradients"),
        paper=Paper(
            authors=("Zhao Chen", "Jiquan Ngiam", "Yanping Huang", "Thang Luong", "Henrik Kretzschmar", "Yuning Chai",
                     "Dragomir Anguelov"),
            title="Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", venue="NeurIPS",
            year=2020, url="https://arxiv.org/abs/2010.06808"),
        stochastic=True, cost="representation",
        original_code="https://github.com/tensorflow/lingvo/blob/master/lingvo/core/graddrop.py",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the random stream's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, leak: float | Sequence[float] = 0.0,
                 marginalize_batch: bool = True, input_sign: bool = True, rescale_norm: bool = True,
                 seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        values = torch.as_tensor(leak, dtype=torch.float64).detach().clone()
        if values.dim() == 0:
            values = values.expand(num_tasks).clone()
        if values.shape != (num_tasks,) or not bool(((values >= 0) & (values <= 1)).all()):
            raise ValueError(f"Parameter `leak` should be a number or {num_tasks} numbers in [0, 1]. Found "
                             f"`leak = {leak!r}`.")
        self.leaks = values
        self.marginalize_batch = check_flag("marginalize_batch", marginalize_batch)
        self.input_sign = check_flag("input_sign", input_sign)
        self.rescale_norm = check_flag("rescale_norm", rescale_norm)
        self.declare_state(per_step="every", generator=initial_stream(seed))

    @property
    def request(self) -> Request:
        reads_z = self.input_sign and self.target == "representation"
        return dataclasses.replace(super().request, representation=reads_z)

    def combine(self, gradients: Tensor, inputs: StepInputs) -> Tensor:
        leaks = self.leaks.to(gradients.device)[inputs.tasks.to(gradients.device)].to(gradients.dtype)
        signal = gradients
        per_sample = self.target == "representation"  # gradients (K, B, ...): the batch first
        z = inputs.representation  # None standalone without one: taken as positive
        if per_sample and self.input_sign and z is not None:
            if z.shape != gradients.shape[1:]:
                raise ShapeMismatchError(f"GradDrop reads the sign of the representation: z has shape "
                                         f"{tuple(z.shape)}, the task gradients {tuple(gradients.shape[1:])}.")
            signal = gradients * z.detach().sign().to(gradients.dtype)
        if per_sample and self.marginalize_batch:
            signal = signal.sum(1, keepdim=True)
        total, magnitude = signal.sum(0), signal.abs().sum(0)
        purity = torch.where(magnitude > 0, 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1)), 0.5)
        with drawing(self.state) as generator:
            if gradients.device.type != "cpu":  # a device generator seeded from the stream
                seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
                generator = torch.Generator(device=gradients.device).manual_seed(seed)
            draw = torch.rand(purity.shape, generator=generator, device=gradients.device)
        positive = purity >= draw.to(gradients.dtype)
        masks = (signal == 0) | (positive & (signal > 0)) | (~positive & (signal < 0))
        shape = (-1, *[1] * (gradients.dim() - 1))
        update = ((leaks.view(shape) + (1 - leaks.view(shape)) * masks) * gradients).sum(0)
        if self.rescale_norm:
            plain = gradients.sum(0).norm()
            update = update * torch.where(plain > 0, update.norm() / torch.where(plain > 0, plain, 1), 0)
        return update
