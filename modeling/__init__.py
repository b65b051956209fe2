"""Network definitions: the frozen teacher and the student. No ranks, files or logging here."""

from modeling.decoder import MiniDPT
from modeling.student import StudentDepthModel, StudentLoadError
from modeling.teacher import DepthAnythingTeacher, TeacherLoadError, TeacherOutput

__all__ = ["DepthAnythingTeacher", "MiniDPT", "StudentDepthModel", "StudentLoadError",
           "TeacherLoadError", "TeacherOutput"]
