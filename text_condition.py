"""
Text-to-image with a class-conditional VAR (MVP paper, Sec. 4.2, Table 3): how MVP extends VAR.

VAR is conditioned on a class embedding (B, C): it is both the start token and the AdaLN input of
every block. In text-to-image mode a caption goes through the frozen CLIP text tower and a small
trainable linear projection into that same space, and replaces the class embedding. The prompts
(with the first-scale prompt on, MVP Table 6) and this projection are all that train.

The projection starts useful: it is initialised as the least-squares map from the CLIP features of
"a photo of a {class}" to VAR's own class embeddings, so before the first step a caption naming a
class already lands near that class's embedding and text-to-image works roughly.
"""
import torch
import torch.nn as nn


class TextCondition(nn.Module):
    def __init__(self, clip_dim: int, width: int):
        super().__init__()
        self.proj = nn.Linear(clip_dim, width)

    def forward(self, text_feats_BD: torch.Tensor) -> torch.Tensor:  # CLIP text features (B, D) -> condition (B, C)
        return self.proj(text_feats_BD.to(self.proj.weight.dtype))

    @torch.no_grad()
    def init_least_squares(self, class_text_feats_KD: torch.Tensor, class_emb_KC: torch.Tensor, ridge: float = 1e-3):
        """Solve min_W ||[T 1] W - E||^2 + ridge ||W||^2 for K classes: T (K, D) CLIP features, E (K, C) embeddings."""
        T = torch.cat((class_text_feats_KD.double(), torch.ones_like(class_text_feats_KD[:, :1]).double()), dim=1)  # (K, D+1)
        E = class_emb_KC.double()
        W = torch.linalg.solve(T.T @ T + ridge * torch.eye(T.shape[1], dtype=T.dtype, device=T.device), T.T @ E)  # (D+1, C)
        self.proj.weight.copy_(W[:-1].T)
        self.proj.bias.copy_(W[-1])
