"""SAEs trained by SAELens's own trainer (`sae_lens.training.sae_trainer.SAETrainer`), offline, on given rows.

The same loop `sae_lens.synthetic.train_toy_sae` runs, fed from a tensor instead of a synthetic generator,
so an SAE can be trained on a crossdict activation cache and saved with SAELens's `save_inference_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch


def train_saelens_sae(X: torch.Tensor, arch: str, path: Path, hook_name: str, d_sae: int, k: int = 4,
                      steps: int = 60, batch: int = 128, seed: int = 0) -> Path:
    """Train a TopK or JumpReLU SAE with SAELens on rows of X `[n, d_in]`; save it (SAELens format) to `path`."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook_name, model_name="tiny")
    d_in = X.shape[1]
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=0.5,
                                                            jumprelu_init_threshold=0.001, metadata=meta))
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield X[torch.randint(0, X.shape[0], (batch,), generator=gen)].float()

    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * batch,
        device="cpu", autocast=False, lr=3e-3, lr_end=3e-3, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=10,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches(), save_checkpoint_fn=lambda p: None).fit()
    sae.save_inference_model(path)
    return Path(path)
