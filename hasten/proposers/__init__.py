"""Proposers: plug-ins that guess token trees (``hasten.methods.build_proposer`` makes one by name)."""

from hasten.proposers.base import ExtraBranch, Proposal, Proposer, StepOutcome

__all__ = ["ExtraBranch", "Proposal", "Proposer", "StepOutcome"]
