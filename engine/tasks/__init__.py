"""Tasks: what the trainer trains. A task owns its model, its data and how both meet.

The trainer runs the same loop for every task; a task supplies the pieces that differ between language
modelling and image classification (see :class:`Task`). :func:`build_task` picks one by ``model.arch``,
the forecasting task when ``train.task = "forecast"``, or self-supervised pretraining (``"simclr"``,
``"vicreg"``, :mod:`.ssl`).
"""
from .base import Task, register
from .build import build_task

__all__ = ["Task", "register", "build_task"]
