"""Colour is never the only cue (issue 32): each method's colour stays apart from every other
under each kind of colour blindness (CIEDE2000 of 19 or more, simulated), stands out from the
white page (3:1, WCAG's contrast for graphics), and each method also has a dash pattern and a
marker of its own, which every curve and bar of it carries."""
import itertools

import pytest

import views
from colour_vision import DICHROMACY, ciede2000, contrast, lab

VISIONS = [None, *DICHROMACY]


@pytest.mark.parametrize("lab1, lab2, expected", [  # Sharma, Wu & Dalal (2005), pairs 1, 2 and 34
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
    ((50, 3.1571, -77.2803), (50, 0, -82.7485), 2.8615),
    ((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514), 0.9082),
])
def test_ciede2000_matches_the_published_pairs(lab1, lab2, expected):
    assert ciede2000(lab1, lab2) == pytest.approx(expected, abs=1e-4)


def test_the_simulation_keeps_grey_grey_and_merges_what_it_should():
    for vision in DICHROMACY:
        assert ciede2000(lab("#777777"), lab("#777777", vision)) < 1  # white point kept
    # the classic confusion: a red and a green of equal lightness look alike to a deuteranope
    assert ciede2000(lab("#d62728"), lab("#2ca02c")) > 40
    assert ciede2000(lab("#d62728", "deuteranopia"), lab("#2ca02c", "deuteranopia")) < 25


def test_every_pair_of_method_colours_stays_apart_in_every_vision():
    colours = {v.name: v.color for v in views.all_views()}
    closest = min(((ciede2000(lab(a, vision), lab(b, vision)), vision or "typical", na, nb)
                   for (na, a), (nb, b) in itertools.combinations(colours.items(), 2) for vision in VISIONS))
    assert closest[0] >= 19, closest  # nine methods: a search over sRGB found 19.1 at best (six reached 22.8)


def test_the_methods_stand_out_from_the_page_and_differ_in_dash_and_marker_too():
    all_views = views.all_views()
    assert all(contrast(v.color) >= 3 for v in all_views), [(v.name, contrast(v.color)) for v in all_views]
    assert len({v.dash for v in all_views}) == len(all_views)
    assert len({v.symbol for v in all_views}) == len(all_views)
