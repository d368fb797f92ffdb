"""Knowledge distillation (Hinton, Vinyals and Dean 2015): the loss, teachers, and small models."""

from still.distill.loss import distillation_loss, logit_matching_loss, soft_target_loss
from still.distill.teachers import CachedTeacher, EnsembleTeacher, Teacher, combine_log_probs

__all__ = ["CachedTeacher", "EnsembleTeacher", "Teacher", "combine_log_probs",
           "distillation_loss", "logit_matching_loss", "soft_target_loss"]
