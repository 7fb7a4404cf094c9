"""Mamba-FSCIL (Li et al., arXiv 2407.06136): dual selective SSM projector, fixed ETF head and its losses."""
from mambacl.strategies.fscil.augment import PUBLISHED_BASE_MIXING, BatchMixing, MixedBatch, mix_batch
from mambacl.strategies.fscil.backbones import FeatureMapBackbone
from mambacl.strategies.fscil.etf import ETFHead, cosine_regression_loss, dot_regression_loss, length_weights
from mambacl.strategies.fscil.losses import LOSS_WEIGHTS, FSCILLossWeights, separation_loss, suppression_loss
from mambacl.strategies.fscil.neck import FourScanSSM, MambaNeck, NeckOutput, ProjectorBranch, SSMOutput
from mambacl.strategies.fscil.strategy import PROTOCOLS, FSCILModel, FSCILProtocol, MambaFSCIL, fscil_summary

__all__ = ["BatchMixing", "ETFHead", "FSCILLossWeights", "FSCILModel", "FSCILProtocol", "FeatureMapBackbone",
           "FourScanSSM", "LOSS_WEIGHTS", "MambaFSCIL", "MambaNeck", "MixedBatch", "NeckOutput", "PROTOCOLS",
           "PUBLISHED_BASE_MIXING", "ProjectorBranch", "SSMOutput", "cosine_regression_loss", "dot_regression_loss",
           "fscil_summary", "length_weights", "mix_batch", "separation_loss", "suppression_loss"]
