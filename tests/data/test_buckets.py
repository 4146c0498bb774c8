from lorabake.data.buckets import BucketSpec, bucket_resolutions, place


def test_kohya_bucket_list():
    spec = BucketSpec((512, 512), min_size=256, max_size=1024, step=64)
    buckets = bucket_resolutions(spec)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_closest_aspect_and_centre_crop():
    spec = BucketSpec((128, 128), min_size=64, max_size=256, step=64)
    assert place(300, 200, spec).bucket == (128, 128)  # aspect 1.5: square beats 192x64 (3.0)
    p = place(400, 100, spec)
    assert p.bucket == (256, 64)
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
    left, top, right, bottom = p.crop
    assert (right - left, bottom - top) == p.bucket


def test_no_upscale_never_enlarges():
    spec = BucketSpec((512, 512), no_upscale=True, step=64)
    p = place(200, 130, spec)
    assert p.bucket == (192, 128) and p.resized == (200, 130)


def test_buckets_disabled_uses_resolution():
    assert place(300, 100, BucketSpec((128, 96), enabled=False)).bucket == (128, 96)
