"""
LAMB (You et al., 2020), the optimiser of DeiT III's recipe, which the paper trains ImageNet with
(lr 3e-3 at batch 2048). torch has none; this is timm's rule (tensors without weight decay take
Adam steps), written with torch._foreach_ calls. textteacher.py imports it; its tests check it
against a per-tensor reference.
"""
import torch


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020), the optimiser of DeiT III's recipe. For each tensor p:

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   t = step
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p
        p = p - lr r u,   r = ||p|| / ||u|| (1 if either is 0) where wd > 0, else r = 1

    The trust ratio r gives every weight matrix a step proportional to its own norm, which lets
    a 2048 batch train at lr 3e-3. As in timm's Lamb, tensors without decay take Adam steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                self.state[p]["step"] += 1
            if not params:
                continue
            # the formula on all tensors of the group at once: a torch._foreach_ call is one
            # operation on a list of tensors, where a loop would launch kernels per tensor
            g = [p.grad for p in params]
            m, v, t = ([self.state[p][k] for p in params] for k in ("m", "v", "step"))
            torch._foreach_lerp_(m, g, 1 - b1)  # m + (1 - b1) (g - m) = b1 m + (1 - b1) g
            torch._foreach_lerp_(v, torch._foreach_mul(g, g), 1 - b2)  # b2 v + (1 - b2) g^2
            v_hat = torch._foreach_div(v, [1 - b2 ** s for s in t])
            denom = torch._foreach_add(torch._foreach_sqrt(v_hat), eps)
            u = torch._foreach_div(torch._foreach_div(m, [1 - b1 ** s for s in t]), denom)
            if wd != 0:
                torch._foreach_add_(u, params, alpha=wd)
                p_norm, u_norm = (torch.stack(torch._foreach_norm(x)) for x in (params, u))
                r = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)  # per tensor
                torch._foreach_mul_(u, list(r.unbind()))
            torch._foreach_add_(params, u, alpha=-lr)
