"""``mimicshield ui`` uploads: checked in full on arrival, kept once, bounded on disk.

Files are written where Gradio puts uploads (the service's cache folder, one folder per file),
because the service only ever deletes files there.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest
from image_cases import noise
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[ui]')")

from mimicshield.cli.main import app as cli_app  # noqa: E402
from mimicshield.images import ImageFileError  # noqa: E402
from mimicshield.webapp import (  # noqa: E402
    ProtectionService,
    UploadLimits,
    UploadRoom,
    build_app,
    validate_uploads,
)


class FakeRequest:
    """What the page's handlers read of Gradio's request: the tab."""

    def __init__(self, session_hash: str) -> None:
        self.session_hash = session_hash


def _service(tmp_path: Path, **limits) -> ProtectionService:
    return ProtectionService(work_root=tmp_path / "work", limits=UploadLimits(**limits))


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(*size, seed=seed)).save(path)
    return path


def _uploaded(service: ProtectionService, name: str, seed: int = 0, **kwargs) -> Path:
    """An image as Gradio stores an upload: in a folder of its own in the cache."""
    return _image(service.cache_dir / secrets.token_hex(8) / name, seed, **kwargs)


def _truncated(path: Path, seed: int = 1, file_format: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(64, 64, seed=seed)).save(path, format=file_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a download or copy that stopped
    return path


@pytest.fixture
def service(tmp_path):
    service = _service(tmp_path)
    yield service
    service.close()


def test_a_truncated_image_is_refused_when_it_is_uploaded(service, tmp_path):
    png = _truncated(service.cache_dir / "a1" / "cut.png")
    jpeg = _truncated(service.cache_dir / "a2" / "cut.jpg", file_format="JPEG")
    good = _uploaded(service, "good.png")
    # its header is intact: a header check alone lets it through, and Protect fails later
    assert validate_uploads([png], service.limits)[1] == []

    accepted, problems = service.accept_uploads("tab", [png, jpeg, good])

    assert [u.name for u in accepted] == ["good.png"]
    assert len(problems) == 2 and all("damaged or incomplete image" in p for p in problems)
    assert problems[0].startswith("cut.png: ") and problems[1].startswith("cut.jpg: ")
    assert str(service.cache_dir) not in "".join(problems)  # the name, never a server path
    assert not png.exists() and not jpeg.exists() and good.exists()  # refused: deleted now


def test_the_same_image_uploaded_twice_is_kept_once(service):
    first = _uploaded(service, "art.png", seed=3)
    again = service.cache_dir / "b7" / "art copy.png"  # the same bytes under another name
    again.parent.mkdir()
    shutil.copyfile(first, again)
    other = _uploaded(service, "other.png", seed=4)

    # Gradio stores the same name and content at one path: listed twice, one file on disk
    accepted, problems = service.accept_uploads("tab", [first, again, other, first])

    assert [u.name for u in accepted] == ["art.png", "other.png"]
    assert problems == [
        "art copy.png: the same image as art.png; it is protected once.",
        "art.png: the same image as art.png; it is protected once.",
    ]
    assert first.exists() and other.exists() and not again.exists()


def test_an_unchanged_upload_is_read_once_however_often_the_list_comes(service, monkeypatch):
    """Every upload event sends the whole list; fifty large photos were decoded and hashed
    again for each added file (and once more when the job started)."""
    import os

    from mimicshield.webapp import uploads  # where validate_uploads looks the check up

    read: list[Path] = []
    check = uploads._check_upload
    monkeypatch.setattr(
        uploads, "_check_upload", lambda path, *args: read.append(path) or check(path, *args)
    )
    first, second = _uploaded(service, "a.png", seed=3), _uploaded(service, "b.png", seed=4)
    service.accept_uploads("tab", [first])
    accepted, _ = service.accept_uploads("tab", [first, second])
    assert [u.name for u in service.validate([first, second])[0]] == ["a.png", "b.png"]
    assert [u.name for u in accepted] == ["a.png", "b.png"]
    assert sorted(read) == sorted([first, second])  # each once
    # a file that changed is read again
    _image(second, seed=5)
    os.utime(second, ns=(0, 10**18))
    service.accept_uploads("tab", [first, second])
    assert read.count(second) == 2 and read.count(first) == 1


def test_refused_and_left_over_uploads_leave_the_disk_at_once(tmp_path):
    limits = UploadLimits(max_images=3)
    service = _service(tmp_path / "small", max_images=3)
    try:
        notes = service.cache_dir / "c1" / "notes.png"
        notes.parent.mkdir(parents=True)
        notes.write_text("not an image\n")
        kept = [_uploaded(service, f"{n}.png", seed=n) for n in range(2)]
        over = _uploaded(service, "over.png", seed=9)

        accepted, problems = service.accept_uploads("tab", [kept[0], notes, kept[1], over])

        assert [u.path for u in accepted] == kept
        assert "4 files uploaded; this app takes at most 3" in problems[-1]
        assert not notes.exists() and not over.exists()
        assert not notes.parent.exists()  # Gradio's folder for the file goes with it
        assert all(path.exists() for path in kept)
        assert limits.tab_bytes == 3 * limits.max_file_bytes  # by default: one full job
    finally:
        service.close()


def test_uploads_are_bounded_per_tab_and_for_the_whole_app(tmp_path):
    probe = _image(tmp_path / "probe.bmp")
    size = probe.stat().st_size  # BMP: every image of this shape has this many bytes
    service = _service(tmp_path, max_tab_bytes=2 * size, max_total_bytes=3 * size)
    try:
        tab_1 = [_uploaded(service, f"a{n}.bmp", seed=n) for n in range(3)]
        accepted, problems = service.accept_uploads("tab-1", tab_1)
        assert [u.path for u in accepted] == tab_1[:2]
        [problem] = problems
        assert problem.startswith("a2.bmp: left out: this tab's uploads would pass 5 KB, ")
        assert problem.endswith("limit per tab. Protect these first, then upload the rest.")
        assert not tab_1[2].exists()

        tab_2 = [_uploaded(service, f"b{n}.bmp", seed=10 + n) for n in range(2)]
        accepted, problems = service.accept_uploads("tab-2", tab_2)
        assert [u.path for u in accepted] == tab_2[:1]  # the app holds 3 images at most
        assert problems[0].startswith("b1.bmp: left out: the uploads of all open tabs")

        service.end_session("tab-1")  # its two images go, which makes room
        again = _uploaded(service, "b1.bmp", seed=11)
        accepted, problems = service.accept_uploads("tab-2", [tab_2[0], again])
        assert [u.path for u in accepted] == [tab_2[0], again] and not problems
        assert service.upload_bytes() == 2 * size
    finally:
        service.close()


def test_the_room_of_a_tab_is_the_bytes_left_under_each_limit(tmp_path):
    """What a tab's image list may still take: the tab's limit less its target image, and the
    app's limit less every other upload; the limits themselves are in the messages."""
    probe = _image(tmp_path / "probe.bmp")
    size = probe.stat().st_size  # BMP: every image of this shape has this many bytes
    service = _service(tmp_path, max_tab_bytes=3 * size, max_total_bytes=5 * size)
    try:
        target = _uploaded(service, "target.bmp", seed=1)
        service.remember_uploads("tab-1", [target])
        service.accept_uploads("tab-2", [_uploaded(service, "other.bmp", seed=2)])
        listed = [_uploaded(service, "a.bmp", seed=3)]
        room = service._room("tab-1", listed)
        assert (room.tab_bytes_left, room.app_bytes_left) == (2 * size, 3 * size)
        assert room.refusal("b.bmp", 2 * size) is None
        assert "this tab's uploads would pass" in room.refusal("b.bmp", 2 * size + 1)
        smaller = UploadRoom(tab_bytes_left=4 * size, app_bytes_left=size, limits=room.limits)
        assert "the uploads of all open tabs" in smaller.refusal("b.bmp", size + 1)
    finally:
        service.close()


def test_a_file_two_tabs_uploaded_goes_only_when_neither_holds_it(service):
    shared = _uploaded(service, "same.png")  # both tabs uploaded it: Gradio keeps one path
    service.accept_uploads("tab-1", [shared])
    service.accept_uploads("tab-2", [shared])
    service.release_uploads("tab-1", [])  # tab 1 removed it from its list
    assert shared.exists()
    service.end_session("tab-2")
    assert not shared.exists()


def test_the_target_image_is_checked_recorded_and_deleted_with_its_tab(service):
    image = _uploaded(service, "art.png")
    service.accept_uploads("tab", [image])
    first = _uploaded(service, "target.png", seed=5)
    assert service.accept_target("tab", first, [image]) == str(first)

    second = _uploaded(service, "target2.png", seed=6)
    service.accept_target("tab", second, [image])  # the replaced target goes at once
    assert not first.exists() and second.exists()

    broken = _truncated(service.cache_dir / "t9" / "broken.png")
    with pytest.raises(ImageFileError, match="^Target image broken.png: damaged"):
        service.accept_target("tab", broken, [image])
    assert not broken.exists() and image.exists()

    third = _uploaded(service, "target3.png", seed=7)
    service.accept_target("tab", third, [image])
    service.end_session("tab")  # closing the tab takes the target with the images
    assert not third.exists() and not image.exists()


def test_the_page_takes_refused_files_out_of_the_list(service):
    demo = build_app(service)
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    good = _uploaded(service, "good.png")
    notes = service.cache_dir / "d1" / "notes.png"
    notes.parent.mkdir()
    notes.write_text("text\n")

    status, listed = handlers["on_upload"]([str(good), str(notes)], None, FakeRequest("tab"))

    assert "1 image(s) ready: good.png" in status and "notes.png: not an image" in status
    assert listed["value"] == [str(good)]  # the list the page shows from now on
    # Checked on `upload`, not on `change`: the list it returns would set `change` off again.
    triggers = {fn.name: [t[1] for t in fn.targets] for fn in demo.fns.values()}
    assert triggers["on_upload"] == ["upload"]


def test_the_byte_limits_are_options_of_the_command(monkeypatch, tiny_model_dir):
    seen = []

    def fake_launch(service, **options):
        seen.append(service.limits)
        service.close()

    monkeypatch.setattr("mimicshield.webapp.launch", fake_launch)
    base = ["ui", "--model", str(tiny_model_dir), "--device", "cpu"]
    runner = CliRunner()
    assert runner.invoke(cli_app, base).exit_code == 0
    result = runner.invoke(cli_app, [*base, "--max-tab-gb", "1.5", "--max-total-gb", "4"])
    assert result.exit_code == 0, result.output
    default, chosen = seen
    assert default.tab_bytes == 50 * 50 * 2**20 and default.max_total_bytes == 10 * 2**30
    assert chosen.tab_bytes == int(1.5 * 2**30) and chosen.max_total_bytes == 4 * 2**30
    for option in ("--max-total-gb", "--max-tab-gb"):
        refused = runner.invoke(cli_app, [*base, option, "0"])
        assert refused.exit_code != 0 and "must be positive" in str(refused.exception)
