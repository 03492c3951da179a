"""Rate arithmetic: reverse water-filling against cases solved by hand, units of the rate."""

from __future__ import annotations

import math

import pytest
import torch

from hrm_vision import rate

#: A spectrum whose water levels are easy on paper.
SPECTRUM = (4.0, 1.0, 0.25)


class TestWaterFilling:
    def test_two_active_components(self) -> None:
        # R = ln 4 with {4, 1} active: ln theta = (ln 4 + ln 1 - 2 ln 4) / 2 = -ln 2, theta = 0.5
        # (1 > 0.5 >= 0.25); distortion 0.5 + 0.5 + 0.25 = 1.25 over 3 numbers.
        assert rate.water_level(SPECTRUM, math.log(4)) == pytest.approx(0.5)
        assert rate.water_filling(SPECTRUM, math.log(4)) == pytest.approx(1.25 / 3)

    def test_one_active_component(self) -> None:
        # R = ln 2 on the largest alone: theta = 4 e^{-2 ln 2} = 1; distortion (1 + 1 + 0.25) / 3.
        assert rate.water_level(SPECTRUM, math.log(2)) == pytest.approx(1.0)
        assert rate.water_filling(SPECTRUM, math.log(2)) == pytest.approx(2.25 / 3)

    def test_every_component_active(self) -> None:
        # R = 4 ln 2: theta = exp((ln 4 + ln 1 + ln 0.25 - 8 ln 2) / 3) = 2^{-8/3}.
        theta = 2 ** (-8 / 3)
        assert rate.water_filling(SPECTRUM, 4 * math.log(2)) == pytest.approx(theta)

    def test_zero_rate_keeps_nothing(self) -> None:
        assert rate.water_filling(SPECTRUM, 0.0) == pytest.approx(sum(SPECTRUM) / 3)

    def test_order_of_the_spectrum_does_not_matter(self) -> None:
        assert rate.water_filling([0.25, 4.0, 1.0], 1.3) == rate.water_filling(SPECTRUM, 1.3)

    def test_level_spends_exactly_the_rate(self) -> None:
        lam = torch.rand(192, generator=torch.Generator().manual_seed(0)) ** 4
        for total in (0.5, 10.0, 256.0):
            theta = rate.water_level(lam, total)
            spent = 0.5 * (lam[lam > theta].double() / theta).log().sum()
            assert float(spent) == pytest.approx(total, rel=1e-6)

    def test_more_rate_less_error_and_never_worse_than_uniform(self) -> None:
        lam = torch.rand(192, generator=torch.Generator().manual_seed(1)) ** 3
        errors = [rate.water_filling(lam, r * 128) for r in (0.25, 0.5, 1.0, 2.0)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
        for r in (0.25, 2.0):
            assert rate.water_filling(lam, r * 128) <= rate.uniform_allocation(lam, r, 128)

    def test_bad_rate_is_refused(self) -> None:
        with pytest.raises(ValueError, match="rate"):
            rate.water_filling(SPECTRUM, -1.0)
        with pytest.raises(ValueError, match="spectrum"):
            rate.water_filling([], 1.0)


class TestUniformAllocation:
    def test_hand_case(self) -> None:
        # two components at 0.5 ln 2 nats each: error halves on {4, 1}, 0.25 dropped.
        assert rate.uniform_allocation(SPECTRUM, 0.5 * math.log(2), 2) == pytest.approx(2.75 / 3)
        # the same total rate (ln 2) water-filled: 2.25 / 3, lower
        assert rate.water_filling(SPECTRUM, math.log(2)) < rate.uniform_allocation(
            SPECTRUM, 0.5 * math.log(2), 2)

    def test_components_out_of_range(self) -> None:
        with pytest.raises(ValueError, match="components"):
            rate.uniform_allocation(SPECTRUM, 1.0, 4)


class TestUnits:
    def test_bits_per_pixel(self) -> None:
        # 2 nats x 128 channels per 64 pixels = 4 nats per pixel = 5.77 bits per pixel
        assert rate.bits_per_pixel(2.0, 128) == pytest.approx(4 / math.log(2))
        assert rate.bits_per_pixel(2.0, 512) == pytest.approx(4 * rate.bits_per_pixel(2.0, 128))

    def test_patch_rate_and_psnr(self) -> None:
        assert rate.patch_rate_nats(0.5, 128) == 64.0
        assert rate.psnr_db(1e-4) == pytest.approx(40.0)
        assert rate.psnr_db(0.0) == math.inf
