"""
Text-to-image with a class-conditional VAR (MVP paper, Sec. 4.2, Table 3): how MVP extends VAR.

VAR is conditioned on a class embedding (B, C): it is both the start token and the AdaLN input of
every block. In text-to-image mode a caption goes through the frozen CLIP text tower and a small
trainable linear projection into that same space, and replaces the class embedding. The prompts
(with the first-scale prompt on, MVP Table 6) and this projection are all that train.

The paper does not say how CLIP's text features reach VAR: the linear projection and its initialisation
are this implementation's design. The projection starts useful: it is initialised as the least-squares
map from CLIP text features to VAR's own class embeddings, fitted on "a photo of a {class}" for every
class and on training captions (each to its image's class embedding). Before the first step a caption
then lands near its class's embedding and text-to-image works roughly. (Fitted on the sentences alone,
K points in a D >= K space, the map is free off their span, and captions, whose features lie elsewhere,
land far from every class.)
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
    def init_least_squares(self, text_feats_ND: torch.Tensor, class_emb_NC: torch.Tensor, ridge: float = 1e-3):
        """Solve min_W ||[T 1] W - E||^2 + ridge ||W||^2 over N texts: T (N, D) CLIP features, E (N, C) the class
        embeddings they should map to."""
        T = torch.cat((text_feats_ND.double(), torch.ones_like(text_feats_ND[:, :1]).double()), dim=1)  # (N, D+1)
        E = class_emb_NC.double()
        W = torch.linalg.solve(T.T @ T + ridge * torch.eye(T.shape[1], dtype=T.dtype, device=T.device), T.T @ E)  # (D+1, C)
        self.proj.weight.copy_(W[:-1].T)
        self.proj.bias.copy_(W[-1])
