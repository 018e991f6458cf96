import numpy as np
import pytest
from PIL import Image

from diffusekit.media.grid import tile_positions, xy_grid
from diffusekit.media.video import label_frames, read_video_info, side_by_side, write_gif, write_mp4


def _solid(rgb, size=(32, 32)):
    return Image.new("RGB", size, rgb)


def test_grid_has_every_tile_where_it_says():
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    tiles = [[_solid(c) for c in row] for row in colors]
    g = xy_grid(tiles, ["Euler", "DPM++ 2M", "Heun"], ["Karras", "Normal"], title="t", x_title="sampler", y_title="schedule")
    pos = tile_positions(g, 2, 3, (32, 32))
    arr = np.asarray(g)
    for (x, y), rgb in zip(pos, [c for row in colors for c in row]):
        assert tuple(arr[y + 16, x + 16]) == rgb
    # labels drew something dark above the tiles and left of them
    assert (arr[: pos[0][1]] < 128).any() and (arr[:, : pos[0][0]] < 128).any()


def test_grid_errors_name_the_problem():
    with pytest.raises(ValueError, match="column labels"):
        xy_grid([[_solid((0, 0, 0))]], ["a", "b"], ["r"])
    with pytest.raises(ValueError, match="every row"):
        xy_grid([[_solid((0, 0, 0))], []], ["a"], ["r", "s"])


def test_mp4_and_gif_have_all_frames(tmp_path):
    frames = [_solid((i * 25, 0, 0), (64, 64)) for i in range(7)]
    labelled = label_frames(frames, sigmas=np.linspace(14.6, 0, 7))
    mp4 = write_mp4(labelled, tmp_path / "v.mp4", fps=2)
    info = read_video_info(mp4)
    assert info["frames"] == 7 and info["size"][0] == labelled[0].width + labelled[0].width % 2
    gif = write_gif(labelled, tmp_path / "v.gif", fps=2)
    with Image.open(gif) as im:
        assert im.n_frames == 7
    sbs = side_by_side([frames, frames[:3]], ["a", "b"])
    assert len(sbs) == 7 and sbs[0].width == 128


def test_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(ValueError):
        write_mp4([], tmp_path / "x.mp4")
    with pytest.raises(ValueError):
        write_mp4([_solid((0, 0, 0))], tmp_path / "x.mp4", fps=0)
    assert list(tmp_path.iterdir()) == []
