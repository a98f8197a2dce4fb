"""FRM and FFM against hand-written formulas of FACTS.md."""

import torch

from crossdet_ray.models.fusion import FFM, FRM, CrossAttention


def test_frm_rectifies_each_stream_with_the_other():
    torch.manual_seed(0)
    dim = 4
    frm = FRM(dim).eval()
    x1, x2 = torch.randn(2, dim, 3, 5), torch.randn(2, dim, 3, 5)
    out1, out2 = frm(x1, x2)

    both = torch.cat((x1, x2), 1)
    pooled = torch.cat((both.mean((2, 3)), both.amax((2, 3))), 1)
    lin1, lin2 = frm.channel_weights.mlp[0], frm.channel_weights.mlp[2]
    wc = torch.sigmoid(lin2(torch.relu(lin1(pooled))))  # (B, 2C)
    wc0, wc1 = wc[:, :dim, None, None], wc[:, dim:, None, None]
    conv1, conv2 = frm.spatial_weights.mlp[0], frm.spatial_weights.mlp[2]
    ws = torch.sigmoid(conv2(torch.relu(conv1(both))))  # (B, 2, H, W)
    ws0, ws1 = ws[:, 0:1], ws[:, 1:2]
    torch.testing.assert_close(out1, x1 + 0.5 * wc1 * x2 + 0.5 * ws1 * x2)
    torch.testing.assert_close(out2, x2 + 0.5 * wc0 * x1 + 0.5 * ws0 * x1)


def test_cross_attention_softmax_runs_over_the_key_channel_axis():
    torch.manual_seed(0)
    heads, dim, tokens = 2, 6, 7
    attention = CrossAttention(dim, heads)
    u1, u2 = torch.randn(1, tokens, dim), torch.randn(1, tokens, dim)
    v1, v2 = attention(u1, u2)

    d = dim // heads

    def context(kv, u):
        k, v = kv(u)[0, :, :dim], kv(u)[0, :, dim:]
        result = []
        for h in range(heads):
            kh, vh = k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
            scores = (kh.T @ vh) * d ** -0.5  # (d, d): rows index k's channel
            result.append(torch.softmax(scores, dim=0))  # over k's channel (dim -2)
        return result

    ctx1, ctx2 = context(attention.kv1, u1), context(attention.kv2, u2)
    expected1 = torch.cat([u1[0, :, h * d:(h + 1) * d] @ ctx2[h] for h in range(heads)], dim=1)
    expected2 = torch.cat([u2[0, :, h * d:(h + 1) * d] @ ctx1[h] for h in range(heads)], dim=1)
    torch.testing.assert_close(v1[0], expected1)
    torch.testing.assert_close(v2[0], expected2)


def test_ffm_follows_the_cross_path_then_the_channel_merge():
    torch.manual_seed(0)
    dim, heads, height, width = 8, 2, 3, 4
    ffm = FFM(dim, num_heads=heads).eval()
    for norm in (ffm.channel_emb.norm, ffm.channel_emb.channel_embed[4]):  # non-trivial BN stats
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    x1, x2 = torch.randn(2, dim, height, width), torch.randn(2, dim, height, width)
    with torch.no_grad():
        fused = ffm(x1, x2)

        cross = ffm.cross
        t1, t2 = x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2)  # (B, N, C)
        y1, u1 = torch.relu(cross.channel_proj1(t1)).chunk(2, dim=-1)
        y2, u2 = torch.relu(cross.channel_proj2(t2)).chunk(2, dim=-1)
        v1, v2 = cross.cross_attn(u1, u2)
        out1 = cross.norm1(t1 + cross.end_proj1(torch.cat((y1, v1), -1)))
        out2 = cross.norm2(t2 + cross.end_proj2(torch.cat((y2, v2), -1)))
        merge = torch.cat((out1, out2), -1).transpose(1, 2).reshape(2, 2 * dim, height, width)
        embed = ffm.channel_emb
        branch = merge
        for layer in embed.channel_embed:
            branch = layer(branch)
        expected = embed.norm(embed.residual(merge) + branch)
    assert fused.shape == (2, dim, height, width)
    torch.testing.assert_close(fused, expected)
    assert cross.norm1.eps == 1e-5 and embed.residual.bias is None
    assert cross.cross_attn.kv1.bias is None and cross.cross_attn.kv2.bias is None
    assert embed.channel_embed[1].groups == dim
