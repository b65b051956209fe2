"""Network definitions: the frozen teacher and the student. No ranks, files or logging here,
except `load_student`, which reads one saved student folder."""

from modeling.decoder import LeanDecoder, MiniDPT
from modeling.student import StudentDepthModel, StudentLoadError, load_student
from modeling.teacher import DepthAnythingTeacher, TeacherLoadError, TeacherOutput

__all__ = ["DepthAnythingTeacher", "LeanDecoder", "MiniDPT", "StudentDepthModel", "StudentLoadError",
           "TeacherLoadError", "TeacherOutput", "load_student"]
