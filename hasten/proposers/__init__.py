"""Proposers: plug-ins that guess token trees. ``build_proposer`` makes one by method name."""

from hasten.proposers.base import ExtraBranch, Proposal, Proposer, StepOutcome

__all__ = ["ExtraBranch", "Proposal", "Proposer", "StepOutcome"]
