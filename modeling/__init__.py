"""Network definitions: the frozen teacher and the student. No ranks, files or logging here,
except `load_student`, which reads one saved student folder."""

import logging

# torchao (brought by the [mobile] extra's litert-torch, and imported by transformers whenever it is
# installed) registers enums with torch's pytree at import, which torch 2.14 warns about at every start.
# (So the imports below come after it.)
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

from modeling.decoder import LeanDecoder, MiniDPT  # noqa: E402
from modeling.student import StudentDepthModel, StudentLoadError, load_student  # noqa: E402
from modeling.teacher import DepthAnythingTeacher, TeacherLoadError, TeacherOutput  # noqa: E402

__all__ = ["DepthAnythingTeacher", "LeanDecoder", "MiniDPT", "StudentDepthModel", "StudentLoadError",
           "TeacherLoadError", "TeacherOutput", "load_student"]
