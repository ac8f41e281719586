"""The offline shapes world and its research tools: the renderer and the judge, the backbone's pretraining, a run's
scores, the paper's tables in miniature. Run them as modules from the repository root: python -m world.pretrain."""
