from lorabake.models import bases


def test_clip_tokenizer_is_the_real_one(tmp_path):
    from transformers import CLIPTokenizer

    bases.write_clip_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_sd_keeps_sd1_topology():
    unet = bases.tiny_unet()
    names = {n for n, _ in unet.named_modules()}
    assert "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k" in names  # cross-attn in level 3
    assert not any(n.startswith("down_blocks.3.attentions") for n in names)        # none in level 4
    assert "mid_block.attentions.0.proj_in" in names and "up_blocks.3.attentions.2.proj_out" in names
    assert len(bases.tiny_vae().config.block_out_channels) == 4
