"""ITK-style registration with hybridreg: itk.Image in, itk.Image and transform out.

    python examples/itk_style.py [FIXED MOVING] [--method hybrid] [--out DIR]

Without files, two neighbouring sections of the built-in phantom are used, the second
deformed by a known random deformation (so the script can print the endpoint error).
"""
import argparse
from pathlib import Path

import itk
import numpy as np

import hybridreg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="*", help="FIXED MOVING (2D images itk can read)")
    ap.add_argument("--method", default="hybrid",
                    choices=["hybrid", "learned", "ssemnet", "elastix"])
    ap.add_argument("--out", type=Path, default=Path("itk-style-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    truth = None
    if args.images:
        fixed = itk.imread(args.images[0], itk.F)
        moving = itk.imread(args.images[1], itk.F)
    else:
        from hybridreg import phantom, synthetic

        ph = phantom.make_phantom(sections=2, shape_yx=(256, 256), seed=0)
        d = synthetic.random_deformation((256, 256), seed=1, spacing_xy=(4.0, 4.0))
        moved = synthetic.warp(ph.stack[1].astype(np.float32), d.forward,
                               spacing_xy=(4.0, 4.0), order=3)[0]
        fixed, moving = (itk.image_from_array(ph.stack[0].astype(np.float32)),
                         itk.image_from_array(moved))
        for img in (fixed, moving):  # nm per pixel, as an EM image would carry
            img.SetSpacing((4.0, 4.0))
        truth = d.recovery
        # the phantom's sections 0 and 1 differ as real neighbours do; register 1 to 0

    # like itk.elastix_registration_method: result image and transform
    out = hybridreg.register(fixed, moving, method=args.method)
    result_image, transform = out
    itk.imwrite(result_image, str(args.out / "result.mha"))
    print(f"result image: {args.out / 'result.mha'} (spacing {tuple(result_image.GetSpacing())})")

    # the transform is an ordinary ITK transform: resample anything with it
    resampled = itk.resample_image_filter(moving, transform=transform,
                                          use_reference_image=True, reference_image=fixed)
    itk.imwrite(resampled, str(args.out / "resampled_by_itk.mha"))
    for warning in out.result.warnings:
        print(f"warning: {warning}")
    if truth is not None:
        from hybridreg.metrics import endpoint_error

        e = endpoint_error(out.field[:, 16:-16, 16:-16], truth[:, 16:-16, 16:-16],
                           spacing_xy=(4.0, 4.0))
        e0 = endpoint_error(np.zeros_like(truth[:, 16:-16, 16:-16]),
                            truth[:, 16:-16, 16:-16], spacing_xy=(4.0, 4.0))
        print(f"endpoint error against the known deformation: {e.mean_px:.2f} px "
              f"(unregistered {e0.mean_px:.2f} px; includes the real difference between the "
              f"two phantom sections)")


if __name__ == "__main__":
    main()
