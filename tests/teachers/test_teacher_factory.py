"""create_teacher: kinds map to teacher classes; an unknown kind names the known ones."""

from __future__ import annotations

import pytest

from eva_pipeline.teachers import TEACHER_KINDS, EfficientNetLiteTeacher, Teacher, create_teacher


def test_unknown_kind_lists_the_known_kinds() -> None:
    with pytest.raises(ValueError) as err:
        create_teacher("dino")
    message = str(err.value)
    assert "dino" in message
    for kind in ("open_clip", "efficientnet_lite0"):
        assert kind in message and kind in TEACHER_KINDS


def test_kind_builds_its_teacher_with_kwargs() -> None:
    teacher = create_teacher("efficientnet_lite0", block_index=7)
    assert isinstance(teacher, EfficientNetLiteTeacher) and isinstance(teacher, Teacher)
    assert teacher.name == "efficientnet_lite0:block7" and teacher.target_dim == 80


def test_target_dim_of_a_small_teacher_is_that_of_the_built_one() -> None:
    from eva_pipeline.teachers import teacher_target_dim

    assert teacher_target_dim("efficientnet_lite0", block_index=7) == 80
