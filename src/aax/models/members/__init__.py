"""Ensemble members (backbone + MC head) and their weights."""

from aax.models.members.backbones import DEFAULT_MEMBERS, MEMBERS, OUTPUT_STRIDES, PAPER_MEMBERS, Member, build_member
from aax.models.members.head import MCHead

__all__ = ["DEFAULT_MEMBERS", "MEMBERS", "MCHead", "Member", "OUTPUT_STRIDES", "PAPER_MEMBERS", "build_member"]
