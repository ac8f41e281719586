"""pretrain.py end to end on a handful of steps: every stage writes loadable files and a report of its gate."""
import json
import os

import numpy as np
import pytest
import torch

import pretrain
import shapes
from pretrained import load_backbone, load_clip


@pytest.fixture(scope='module')
def pretrained_folder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('backbone'))
    pretrain.main(['--stage', 'all', '--out', out, '--n_train', '64', '--vae_steps', '3', '--decoder_steps', '3', '--var_steps', '3',
                   '--clip_steps', '2', '--classifier_steps', '2', '--log_every', '1', '--gate_per_class', '2',
                   '--vae_batch', '8', '--decoder_batch', '4', '--var_batch', '8', '--clip_batch', '16', '--device', 'cpu'])
    return out


def report(out: str, stage: str) -> dict:
    with open(os.path.join(out, f'report_{stage}.json')) as f:
        return json.load(f)


def test_every_stage_reports_its_gate(pretrained_folder):
    vqvae = report(pretrained_folder, 'vqvae')
    assert 0 < vqvae['heldout_psnr_db'] < 60 and 0 < vqvae['codebook_usage'] <= 1
    assert all(1 <= p <= 1024 for p in vqvae['code_perplexity_per_scale']) and len(vqvae['code_perplexity_per_scale']) == 7
    assert len(vqvae['latent_energy_left_per_scale']) == 7 and all(v >= 0 for v in vqvae['latent_energy_left_per_scale'])
    assert 0 <= vqvae['recon_shape_recognised'] <= 1  # the classifier stage ran first, so this is measured
    var = report(pretrained_folder, 'var')
    assert 0 <= var['class_recognised'] <= 1 and var['samples'] == 2 * shapes.NUM_CLASSES
    assert var['fd_clip_samples'] > 0 and var['fd_clip_reconstructions'] > 0 and var['cfg'] == 1.5
    assert set(var['attribute_tv_samples']) == set(shapes.READ_ATTRIBUTES)
    assert all(0 <= tv <= 1 for tv in var['attribute_tv_reconstructions'].values())
    assert set(var['attributes_samples']['size']) <= {'small', 'medium', 'large', 'none'}
    assert all(len(var[f'ce_{s}_per_scale']) == len(pretrain.PATCH_NUMS) for s in ('train', 'heldout'))
    clip = report(pretrained_folder, 'clip')
    assert 0 <= clip['image_to_caption_top1'] <= 1 and clip['kappa'] == 4
    assert clip['names_class_at_kappa'] == clip['scale4_names_class']
    assert all(0 <= clip[f'scale{k}_names_class{of}'] <= 1 for k in range(1, 8) for of in ('', '_of_target'))
    assert 0 <= report(pretrained_folder, 'classifier')['heldout_accuracy'] <= 1
    decoder = report(pretrained_folder, 'decoder')
    assert all(0 < decoder[f'scale{k}_psnr_db'] < 60 for k in range(1, len(pretrain.PATCH_NUMS) + 1))
    assert all(report(pretrained_folder, s)['steps'] > 0 for s in ('vqvae', 'decoder', 'var', 'clip', 'classifier'))


def test_the_clip_stage_sees_a_quarter_of_its_batch_as_the_vqvae_decodes_coarse_partial_sums(pretrained_folder):
    vae, _ = load_backbone(pretrained_folder)
    x = shapes.to_input(shapes.rendered('test', 8, 0)[0])
    seen = pretrain.quarter_as_coarse_decodes(vae, x, np.random.default_rng(0))
    assert torch.equal(seen[2:], x[2:])  # three quarters untouched
    scales = np.random.default_rng(0).integers(2, 6, 2)  # the same draw: 0-based scales 2..K-2
    partial = pretrain.decoded_partial_sums(vae, x[:2])
    for b, k in enumerate(scales):
        assert torch.allclose(seen[b], partial[k][b].clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(seen[:2], partial[-1], atol=1e-3)  # never the full reconstruction


def test_attribute_tv_is_zero_for_one_distribution_and_grows_as_one_attribute_moves():
    items = [a for a in shapes.make_split('test', 240, seed=1) if a['colour'] != 'white'][:200]
    renders = np.stack([shapes.render(a) for a in items])
    seen = shapes.attribute_distributions(renders)
    assert all(abs(sum(fractions.values()) - 1) < 0.01 for fractions in seen.values())
    assert shapes.attribute_tv(seen, seen) == {key: 0.0 for key in shapes.READ_ATTRIBUTES}
    on_white = np.stack([shapes.render({**a, 'background': 'white'}) for a in items])
    assert shapes.attribute_distributions(on_white)['background'] == {'white': 1.0}
    tv = shapes.attribute_tv(shapes.attribute_distributions(on_white), seen)
    # every background white against about a quarter of the references' (white shapes left out)
    assert tv['background'] > 0.5 and tv['position'] < 0.1


def test_written_models_load_strictly_and_run(pretrained_folder):
    vae, var = load_backbone(pretrained_folder)
    assert var.patch_nums == pretrain.PATCH_NUMS and var.num_classes == shapes.NUM_CLASSES
    S = shapes.IMAGE_SIZE
    x = torch.rand(2, 3, S, S) * 2 - 1
    with torch.no_grad():
        idx = var.generate(vae, var.class_emb(torch.tensor([0, 1])), cfg=1.5, top_k=0, top_p=0.0, seed=0)
        assert vae.idx_to_img(idx).shape == (2, 3, S, S)
        assert shapes.load_shape_classifier(pretrained_folder)(x).shape == (2, shapes.NUM_CLASSES)
    model, tokenizer = load_clip(os.path.join(pretrained_folder, 'clip'))
    assert model.encode_text(tokenizer(['a photo of a star'])).shape[-1] == pretrain.CLIP_CFG['embed_dim']


def test_the_saved_clip_keeps_only_the_worlds_vocabulary_and_computes_what_the_full_one_did(tmp_path):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**pretrain.CLIP_CFG).eval().half().float()  # its weights as saved (fp16)
    full = open_clip.tokenizer.SimpleTokenizer(context_length=pretrain.CLIP_CFG['text_cfg']['context_length'])
    pretrain.save_clip(model, full, str(tmp_path / 'clip'))
    saved, tokenizer = load_clip(str(tmp_path / 'clip'))
    assert os.path.isfile(tmp_path / 'clip' / 'bpe_simple_vocab.txt.gz')
    assert tokenizer.vocab_size == saved.token_embedding.num_embeddings < 2000  # of 49,408
    items = shapes.make_split('test', 300, seed=3)
    texts = [shapes.caption(a) for a in items] + [shapes.sentence(c) for c in range(shapes.NUM_CLASSES)] + \
        ['a big rhombus on a navy background', 'a turquoise donut', '']  # parse_caption's synonyms; the padding text
    pieces = lambda tok, t: [tok.decoder[i] for i in tok.encode(t)]
    assert [pieces(full, t) for t in texts] == [pieces(tokenizer, t) for t in texts]  # the same tokens, other ids
    assert tokenizer(texts).argmax(-1).tolist() == full(texts).argmax(-1).tolist()  # the end-of-text token: the pooled one
    with torch.no_grad():
        assert torch.equal(model.encode_text(full(texts)), saved.encode_text(tokenizer(texts)))
    assert tokenizer.decode(tokenizer.encode('zebra')).strip() == 'zebra'  # other words: bytes and the pieces kept


class Killed(Exception):
    pass


def run_killed_after_save(argv, kill_step: int, monkeypatch):
    """pretrain.main(argv), stopped as by a kill right after the stage saved its state at step kill_step."""
    original_save = pretrain.Resumable.maybe_save

    def save_then_kill(self, step, total, *state):
        original_save(self, step, total, *state)
        if step == kill_step:
            raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(pretrain.Resumable, 'maybe_save', save_then_kill)
        with pytest.raises(Killed):
            pretrain.main(argv)


def test_an_interrupted_stage_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A stage killed after its step-2 state was saved, run again, ends with the same weights as a run never stopped."""
    flags = ['--stage', 'classifier', '--n_train', '64', '--classifier_steps', '4', '--ckpt_every', '2', '--gate_per_class', '2',
             '--device', 'cpu']
    pretrain.main(flags + ['--out', str(tmp_path / 'whole')])
    run_killed_after_save(flags + ['--out', str(tmp_path / 'stopped')], 2, monkeypatch)
    assert os.path.isfile(tmp_path / 'stopped' / 'resume' / 'classifier.pt')
    pretrain.main(flags + ['--out', str(tmp_path / 'stopped')])
    assert not os.path.exists(tmp_path / 'stopped' / 'resume' / 'classifier.pt')  # a finished stage leaves no state
    whole = torch.load(tmp_path / 'whole' / 'shape_classifier.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'stopped' / 'shape_classifier.pth', weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_resumed_stage_counts_the_seconds_of_every_run(tmp_path):
    model, rng = torch.nn.Linear(2, 2), np.random.default_rng(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = pretrain.Resumable(str(tmp_path), 'stage', every=1)
    first.start -= 1000  # as if it had trained for 1000 s before its save
    first.maybe_save(1, 10, model, opt, rng)
    second = pretrain.Resumable(str(tmp_path), 'stage', every=1)
    assert second.seconds() < 10
    assert second.restore(model, opt, rng) == 1 and 1000 <= second.seconds() < 1010


@pytest.mark.parametrize('flags, message', [
    (['--stage', 'var'], '--stage var: no backbone.json, vqvae.pth, clip, shape_classifier.pth in --out'),
    (['--stage', 'decoder'], '--stage decoder: no backbone.json, vqvae.pth in --out'),
    (['--stage', 'clip'], '--stage clip: no backbone.json, vqvae.pth in --out'),
    (['--stage', 'vqvae', '--evaluate'], '--stage vqvae --evaluate: no backbone.json, vqvae.pth, var.pth in --out'),
    (['--stage', 'clip', '--clip_steps', '0'], '--clip_steps must be positive, got 0'),
    (['--stage', 'classifier', '--device', 'gpu0'], '--device gpu0 is not a device'),
    (['--stage', 'vqvae', '--vae_coarse_weight', '-1'], '--vae_coarse_weight must be 0 or more, got -1.0'),
    (['--stage', 'vqvae', '--vae_init', '/nonexistent-folder'], '--vae_init /nonexistent-folder: no backbone.json and vqvae.pth there'),
    (['--stage', 'var', '--var_init', '/nonexistent-folder'], '--var_init /nonexistent-folder: no backbone.json and var.pth there'),
])
def test_bad_input_stops_with_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / 'new'
    with pytest.raises(SystemExit) as stop:
        pretrain.main(['--out', str(out), '--device', 'cpu'] + flags)
    assert str(stop.value).startswith('error: ' + message) and '\n' not in str(stop.value)
    assert not out.exists()  # nothing rendered, trained or written


def test_the_var_stage_may_start_from_a_saved_var(pretrained_folder, tmp_path):
    import shutil
    out = tmp_path / 'copy'
    shutil.copytree(pretrained_folder, out)
    pretrain.main(['--stage', 'var', '--out', str(out), '--var_init', pretrained_folder, '--var_steps', '1', '--var_lr', '1e-9',
                   '--var_batch', '4', '--n_train', '16', '--gate_per_class', '1', '--seed', '1', '--device', 'cpu'])
    before, after = (dict(load_backbone(folder)[1].named_parameters()) for folder in (pretrained_folder, str(out)))
    assert all(torch.allclose(before[name].float(), after[name].float(), atol=1e-3) for name in before)  # lr ~0: the init


def test_a_stage_starts_only_from_a_backbone_of_the_architecture_it_trains(pretrained_folder, tmp_path):
    import shutil
    other = tmp_path / 'other'
    shutil.copytree(pretrained_folder, other)
    config = json.loads((other / 'backbone.json').read_text())
    config['var']['depth'] = 2
    (other / 'backbone.json').write_text(json.dumps(config))
    with pytest.raises(SystemExit) as stop:
        pretrain.main(['--stage', 'var', '--out', pretrained_folder, '--var_init', str(other), '--device', 'cpu'])
    assert str(stop.value).startswith(f'error: --var_init {other}: its var in backbone.json is not the one this script trains')


def test_stage_all_needs_nothing_in_out_and_a_stage_may_use_what_is_there(pretrained_folder):
    args = type('Args', (), {name: 1 for name in pretrain.POSITIVE})()
    args.out, args.evaluate, args.device = '/nonexistent-folder', False, 'cpu'
    args.vae_coarse_weight, args.vae_init, args.var_init = 0.0, '', ''
    assert pretrain.input_error(args, tuple(pretrain.STAGES)) == ''  # each stage writes what the next one reads
    args.out = pretrained_folder
    assert pretrain.input_error(args, ('var',)) == ''
    args.evaluate = True
    assert all(pretrain.input_error(args, (stage,)) == '' for stage in pretrain.STAGES)


def test_evaluate_rewrites_a_report_from_the_saved_files(pretrained_folder):
    before = report(pretrained_folder, 'classifier')
    pretrain.main(['--stage', 'classifier', '--out', pretrained_folder, '--evaluate', '--gate_per_class', '2', '--device', 'cpu'])
    assert report(pretrained_folder, 'classifier') == before  # same files, same figures, training figures kept


def test_the_decoder_stage_changes_the_decoder_alone(pretrained_folder, tmp_path):
    """The tokens (encoder, quant_conv, codebook, phi) and the VAR trained on them stay as they were."""
    import shutil
    out = str(tmp_path / 'copy')
    shutil.copytree(pretrained_folder, out)
    before_vae, before_var = load_backbone(out)
    pretrain.main(['--stage', 'decoder', '--out', out, '--n_train', '64', '--decoder_steps', '2', '--decoder_batch', '4',
                   '--decoder_lr', '1e-2', '--gate_per_class', '2', '--device', 'cpu'])
    after_vae, after_var = load_backbone(out)
    changed = {k for k, v in after_vae.state_dict().items() if not torch.equal(v, before_vae.state_dict()[k])}
    assert changed and all(k.startswith(('decoder.', 'post_quant_conv.')) for k in changed), sorted(changed)[:5]
    assert all(torch.equal(v, before_var.state_dict()[k]) for k, v in after_var.state_dict().items())


def test_the_var_stage_compiled_takes_the_same_steps(pretrained_folder, tmp_path, capsys):
    """--compile changes how the VAR's steps run, not what they compute: the same losses step by step (fp32)."""
    import re
    import shutil
    losses = {}
    for name, extra in (('eager', []), ('compiled', ['--compile'])):
        out = str(tmp_path / name)
        shutil.copytree(pretrained_folder, out)
        capsys.readouterr()
        pretrain.main(['--stage', 'var', '--out', out, '--n_train', '64', '--var_steps', '3', '--var_batch', '8',
                       '--var_lr', '0.1', '--log_every', '1', '--gate_per_class', '1', '--dtype', 'fp32', '--device', 'cpu']
                      + extra)
        losses[name] = [float(v) for v in re.findall(r'\[var\] step \d+/3 loss ([\d.]+)', capsys.readouterr().out)]
    assert len(losses['eager']) == 3 and losses['eager'][2] < losses['eager'][0]  # the steps trained the VAR
    assert losses['compiled'] == pytest.approx(losses['eager'], abs=2e-4)


def test_dtype_flag_resolves_to_an_autocast_or_to_none():
    cpu = torch.device('cpu')
    assert pretrain.resolve_dtype('fp32', cpu) == torch.float32 and pretrain.resolve_dtype('bf16', cpu) == torch.bfloat16
    assert pretrain.resolve_dtype('auto', cpu) in (torch.float32, torch.bfloat16)  # bf16 only with bf16 matrix units
    layer = torch.nn.Linear(4, 4)
    with pretrain.autocast(cpu, torch.bfloat16):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with pretrain.autocast(cpu, torch.float32):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_teacher_forced_ce_of_an_untrained_var_is_a_uniform_guess(pretrained_folder):
    vae, _ = load_backbone(pretrained_folder)
    torch.manual_seed(0)
    untrained = pretrain.VAR(**pretrain.VAR_KWARGS).eval()
    images, items = shapes.rendered('test', 6)
    ce = pretrain.teacher_forced_ce(vae, untrained, images, [a['label'] for a in items], torch.device('cpu'))
    assert len(ce) == len(pretrain.PATCH_NUMS)
    assert all(abs(c - np.log(untrained.vocab_size)) < 0.1 for c in ce)  # near-zero logits: log V nats a token


def test_code_perplexity_counts_the_codes_a_scale_uses(pretrained_folder):
    vae, _ = load_backbone(pretrained_folder)
    images = shapes.rendered('test', 20)[0]
    perplexity = pretrain.code_perplexity(pretrain.tokenise(vae, images, 'cpu'), vae.vocab_size)
    assert perplexity[0] <= 20 and all(1 <= p <= min(20 * pn * pn, 1024) for p, pn in zip(perplexity, vae.patch_nums))
    blank = np.zeros_like(images)  # one image repeated: every scale's codes are the same at each position
    assert pretrain.code_perplexity(pretrain.tokenise(vae, blank, 'cpu'), vae.vocab_size)[0] == 1.0


def test_latent_energy_left_falls_to_the_reconstructions_error_and_stays_whole_when_nothing_is_quantized(pretrained_folder):
    vae, _ = load_backbone(pretrained_folder)
    x = shapes.to_input(shapes.rendered('test', 6)[0])
    left = pretrain.latent_energy_left(vae, x, chunk=4)  # two chunks, summed before the ratio
    f = vae.quant_conv(vae.encoder(x)).float()
    f_hat = vae.quantize.residual_quantize(f)[1][-1]
    assert len(left) == len(vae.patch_nums)
    assert abs(left[-1] - ((f - f_hat).square().sum() / f.square().sum()).item()) < 1e-3
    with torch.no_grad():  # codes and phis that add nothing: every scale leaves the whole latent unexplained
        vae.quantize.embedding.weight.zero_()
        for phi in vae.quantize.quant_resi.qresi_ls:
            phi.weight.zero_()
            phi.bias.zero_()
    assert pretrain.latent_energy_left(vae, x) == [1.0] * len(vae.patch_nums)


def test_a_coarse_partial_sum_is_the_quantizers_own_and_trains_codes_phis_and_encoder(pretrained_folder):
    vae, _ = load_backbone(pretrained_folder)
    vae = vae.float()
    f = vae.quant_conv(vae.encoder(shapes.to_input(shapes.rendered('test', 4)[0]))).detach().requires_grad_(True)
    scale_B = torch.tensor([0, 2, 5, 3])
    coarse = pretrain.coarse_partial_sums(vae.quantize, f, scale_B)
    f_hats = vae.quantize.residual_quantize(f)[1]
    for b, k in enumerate(scale_B.tolist()):
        assert torch.allclose(coarse[b], f_hats[k][b], atol=1e-5)  # the straight-through adds nothing forward
    coarse.square().sum().backward()
    assert f.grad.abs().sum() > 0 and vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(phi.weight.grad is not None for phi in vae.quantize.quant_resi.qresi_ls[:2])  # coarse scales' phis


def test_the_vqvae_stage_may_start_from_a_saved_vqvae_and_add_the_partial_sum_loss(pretrained_folder, tmp_path, capsys):
    out = str(tmp_path / 'v3')
    pretrain.main(['--stage', 'vqvae', '--out', out, '--vae_init', pretrained_folder, '--vae_coarse_weight', '1',
                   '--vae_steps', '1', '--vae_lr', '1e-9', '--vae_batch', '4', '--n_train', '16', '--gate_per_class', '1',
                   '--log_every', '1', '--seed', '1', '--device', 'cpu'])
    logged = capsys.readouterr().out
    assert ' coarse ' in logged and ' coarse 0.0000 ' not in logged
    before, after = (dict(load_backbone(folder)[0].named_parameters()) for folder in (pretrained_folder, out))
    assert all(torch.allclose(before[name].float(), after[name].float(), atol=1e-3) for name in before)  # lr ~0: the init


def test_a_resumed_var_stage_reuses_its_tokens_and_ends_as_an_uninterrupted_one(pretrained_folder, tmp_path, monkeypatch):
    import shutil
    flags = ['--stage', 'var', '--n_train', '64', '--var_steps', '3', '--var_batch', '8', '--ckpt_every', '1',
             '--gate_per_class', '1', '--dtype', 'fp32', '--device', 'cpu']
    for name in ('whole', 'stopped'):
        shutil.copytree(pretrained_folder, tmp_path / name)
    pretrain.main(flags + ['--out', str(tmp_path / 'whole')])
    run_killed_after_save(flags + ['--out', str(tmp_path / 'stopped')], 1, monkeypatch)
    assert os.path.isfile(pretrain.tokens_path(str(tmp_path / 'stopped')))
    original_rendered = pretrain.rendered

    def all_but_the_training_set(split, n, *args):  # the report still renders its own few images
        assert (split, n) != ('train', 64), 'the resumed stage rendered its training set again'
        return original_rendered(split, n, *args)
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, 'rendered', all_but_the_training_set)
        pretrain.main(flags + ['--out', str(tmp_path / 'stopped')])
    assert os.listdir(tmp_path / 'stopped' / 'resume') == []  # a finished stage leaves no state and no tokens
    whole, resumed = load_backbone(str(tmp_path / 'whole'))[1].state_dict(), load_backbone(str(tmp_path / 'stopped'))[1].state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
