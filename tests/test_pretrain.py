"""world/pretrain.py at tiny sizes: every stage writes loadable files and a report of its gate; the build stops at the
first gate missed; a stopped stage resumes where it stopped."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrained import load_backbone, load_clip
from world import pretrain, shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what every stage reads at tiny sizes; a run of main() in the tests adds --out and --stage
TINY = ['--judge_n', '100', '--judge_epochs', '1', '--gate_n', '20', '--n_train', '64', '--vae_steps', '2',
        '--vae_batch', '4', '--clip_steps', '2', '--clip_batch', '8', '--var_steps', '2', '--var_batch', '4',
        '--vae_ch', '8', '--log_every', '1', '--ckpt_every', '1', '--device', 'cpu', '--dtype', 'fp32']


def run_pretrain(out, *flags):
    return subprocess.run([sys.executable, '-m', 'world.pretrain', '--out', str(out), *TINY, '--threads', '1', *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def tiny_backbone_folder(tmp_path_factory):
    """A tiny backbone, built twice: stopped at the first gate missed (what --out held then), then on with
    --keep_going."""
    out = tmp_path_factory.mktemp('backbone')
    stopped = run_pretrain(out)
    after_stop = sorted(os.listdir(out))
    return out, stopped, after_stop, run_pretrain(out, '--keep_going')


def report(out, stage: str) -> dict:
    with open(os.path.join(out, f'report_{stage}.json')) as f:
        return json.load(f)


def test_every_stage_writes_its_gate_and_the_build_stops_at_the_first_missed(tiny_backbone_folder):
    out, stopped, after_stop, result = tiny_backbone_folder
    assert stopped.returncode != 0 and 'gate G0 missed' in stopped.stderr.strip().splitlines()[-1]  # a 1-epoch judge
    assert 'report_judge.json' in after_stop and not {'vqvae.pth', 'report_vqvae.json'} & set(after_stop)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '[judge] finished earlier' in result.stdout  # the finished stage is not trained again
    reports = {s: report(out, s) for s in pretrain.STAGES}
    for stage, gate in pretrain.GATES.items():
        assert isinstance(reports[stage][gate], bool) and reports[stage]['steps'] > 0, stage
    assert {'at_kappa', 'full', 'chance'} <= set(reports['judge'])
    assert {'heldout_psnr_db', 'own_tokens_at_kappa', 'judge_on_reconstructions'} <= set(reports['vqvae'])
    assert {'image_to_caption_top1', 'names_class_at_kappa'} <= set(reports['clip'])
    assert {'class_recognised', 'fd_judge_samples', 'fd_ratio', 'is_judge', 'precision', 'recall',
            'sentence_loss_own_first_map', 'sentence_loss_predicted_first_map'} <= set(reports['var'])
    assert reports['var']['samples'] == 20 and reports['var']['guessing_level'] == pytest.approx(np.log(16), abs=1e-3)
    # the VQVAE trains on the partial-sum loss too
    assert ' coarse ' in result.stdout and ' coarse 0.0000 ' not in result.stdout
    for name in ('judge.pth', 'vqvae.pth', 'var.pth', 'backbone.json', 'clip', 'renders.png'):
        assert (out / name).exists()
    assert not os.listdir(out / 'resume')  # every finished stage removed its state, the VAR's tokens too


@pytest.mark.parametrize('flags, message', [
    (['--gate_n', '15'], '--gate_n must be a multiple of 10'),
    (['--stage', 'clip'], '--stage clip: no judge.pth, backbone.json, vqvae.pth, var.pth in --out'),
    (['--stage', 'var'], '--stage var: no judge.pth, backbone.json, vqvae.pth, var.pth, clip in --out'),
    (['--stage', 'vqvae', '--evaluate'], '--stage vqvae --evaluate: no judge.pth, backbone.json, vqvae.pth, var.pth in --out'),
    (['--vae_steps', '0'], '--vae_steps must be positive, got 0'),
    (['--clip_lr', '0'], '--clip_lr must be positive, got 0.0'),
    (['--vae_coarse_share', '0'], '--vae_coarse_share must be in (0, 1], got 0.0'),
    (['--vae_coarse_weight', '-1'], '--vae_coarse_weight must be 0 or more, got -1.0'),
    (['--device', 'gpu0'], '--device gpu0 is not a device'),
])
def test_bad_input_stops_with_one_line_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit) as stop:
        pretrain.main(['--out', str(tmp_path / 'out'), *flags])
    assert str(stop.value).startswith(f'error: {message}') and '\n' not in str(stop.value)
    assert not (tmp_path / 'out').exists()  # checked before any work: nothing rendered, trained or written


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / 'out').write_text('')
    with pytest.raises(SystemExit) as stop:
        pretrain.main(['--out', str(tmp_path / 'out')])
    assert str(stop.value) == f'error: --out {tmp_path / "out"} is a file, not a folder'


def test_stage_all_needs_nothing_in_out_and_a_stage_may_use_what_is_there(tiny_backbone_folder, tmp_path):
    args = argparse.Namespace(**{name: 1 for name in pretrain.POSITIVE})
    args.out, args.evaluate, args.device = str(tmp_path / 'none'), False, 'cpu'
    args.gate_n, args.vae_coarse_share, args.vae_coarse_weight = 10, 0.25, 0.0
    assert pretrain.input_error(args, tuple(pretrain.STAGES)) == ''  # each stage writes what the next one reads
    assert pretrain.input_error(args, ('vqvae', 'clip', 'var')).startswith('--stage vqvae: no judge.pth')
    assert pretrain.input_error(args, ('var',)).startswith('--stage var: no judge.pth, backbone.json, vqvae.pth, var.pth, clip')
    args.out = str(tiny_backbone_folder[0])
    assert pretrain.input_error(args, ('var',)) == ''
    args.evaluate = True
    assert all(pretrain.input_error(args, (stage,)) == '' for stage in pretrain.STAGES)
    args.out = str(tmp_path)  # only a judge: its gate can be measured again, the VQVAE's not
    shutil.copy(tiny_backbone_folder[0] / 'judge.pth', tmp_path)
    assert pretrain.input_error(args, ('judge',)) == ''
    assert pretrain.input_error(args, ('vqvae',)).startswith('--stage vqvae --evaluate: no backbone.json, vqvae.pth')


def test_written_models_load_strictly_and_run(tiny_backbone_folder):
    folder = str(tiny_backbone_folder[0])
    vae, var = load_backbone(folder)  # strict: every key, every shape
    assert var.patch_nums == pretrain.PATCH_NUMS and var.num_classes == shapes.NUM_CLASSES
    S = shapes.IMAGE_SIZE
    with torch.no_grad():
        idx = var.generate(vae, var.class_emb(torch.tensor([0, 1])), cfg=1.5, top_k=0, top_p=0.0, seed=0)
        assert [m.shape for m in idx] == [(2, pn * pn) for pn in pretrain.PATCH_NUMS]
        assert vae.idx_to_img(idx).shape == (2, 3, S, S)
        heads = shapes.logits_of(shapes.load_judge(folder)(torch.rand(2, 3, S, S) * 2 - 1))
    assert {a: h.shape for a, h in heads.items()} == {a: (2, len(v)) for a, v in shapes.VALUES.items()}
    model, tokenizer = load_clip(os.path.join(folder, 'clip'))
    with torch.no_grad():
        assert model.encode_text(tokenizer(['a photo of a star'])).shape == (1, pretrain.CLIP_CFG['embed_dim'])
        assert model.encode_image(torch.zeros(1, 3, S, S)).shape == (1, pretrain.CLIP_CFG['embed_dim'])


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
        [' '.join(shapes.world_words()), 'A Pinstriped CYAN star', '']  # every word; case; the padding text
    pieces = lambda tok, t: [tok.decoder[i] for i in tok.encode(t)]
    assert [pieces(full, t) for t in texts] == [pieces(tokenizer, t) for t in texts]  # the same tokens, other ids
    assert tokenizer(texts).argmax(-1).tolist() == full(texts).argmax(-1).tolist()  # end-of-text: the pooled token
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


def test_an_interrupted_stage_resumes_where_it_stopped(tiny_backbone_folder, tmp_path, monkeypatch):
    """A VQVAE stage killed after its step-2 state was saved, run again, ends with the same weights as a run never
    stopped (its gate is left out: the weights are the point)."""
    monkeypatch.setattr(pretrain, 'evaluate_vqvae', lambda args: {'G1_met': False})
    flags = ['--stage', 'vqvae', *TINY, '--vae_steps', '4', '--ckpt_every', '2']
    for name in ('whole', 'stopped'):
        os.makedirs(tmp_path / name)
        shutil.copy(tiny_backbone_folder[0] / 'judge.pth', tmp_path / name)
    pretrain.main(flags + ['--out', str(tmp_path / 'whole')])
    run_killed_after_save(flags + ['--out', str(tmp_path / 'stopped')], 2, monkeypatch)
    assert os.path.isfile(tmp_path / 'stopped' / 'resume' / 'vqvae.pt')
    assert not os.path.exists(tmp_path / 'stopped' / 'vqvae.pth')
    pretrain.main(flags + ['--out', str(tmp_path / 'stopped')])
    assert not os.listdir(tmp_path / 'stopped' / 'resume')  # a finished stage leaves no state
    assert report(tmp_path / 'stopped', 'vqvae')['steps'] == 4
    whole, resumed = (load_backbone(str(tmp_path / name))[0].state_dict() for name in ('whole', 'stopped'))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the codebook's usage counts too
    untrained = pretrain.VQVAE(**dict(pretrain.VAE_KWARGS, ch=8)).state_dict()
    assert not torch.equal(whole['quantize.embedding.weight'], untrained['quantize.embedding.weight'].half())


def test_a_resumed_stage_counts_the_seconds_of_every_run(tmp_path):
    model, rng = torch.nn.Linear(2, 2), np.random.default_rng(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = pretrain.Resumable(str(tmp_path), 'stage', every=1)
    first.start -= 1000  # as if it had trained for 1000 s before its save
    first.maybe_save(1, 10, model, opt, rng)
    second = pretrain.Resumable(str(tmp_path), 'stage', every=1)
    assert second.seconds() < 10
    assert second.restore(model, opt, rng) == 1 and 1000 <= second.seconds() < 1010
    second.finish()
    assert not os.path.exists(second.path)


def test_evaluate_rewrites_a_report_from_the_saved_files(tiny_backbone_folder, tmp_path):
    out = tmp_path / 'copy'
    shutil.copytree(tiny_backbone_folder[0], out)
    before = report(out, 'judge')
    (out / 'report_judge.json').write_text(json.dumps({'steps': before['steps'], 'seconds': before['seconds'],
                                                       'G0_met': True}))
    pretrain.main(['--stage', 'judge', '--out', str(out), '--evaluate', *TINY])
    assert report(out, 'judge') == before  # same files, same figures, the training figures kept


def test_a_resumed_var_stage_reuses_its_tokens_and_ends_as_an_uninterrupted_one(tiny_backbone_folder, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(pretrain, 'evaluate_var', lambda args: {'G3_met': False})
    flags = ['--stage', 'var', *TINY, '--var_steps', '3']
    for name in ('whole', 'stopped'):
        shutil.copytree(tiny_backbone_folder[0], tmp_path / name)
    pretrain.main(flags + ['--out', str(tmp_path / 'whole')])
    run_killed_after_save(flags + ['--out', str(tmp_path / 'stopped')], 1, monkeypatch)
    assert sorted(os.listdir(tmp_path / 'stopped' / 'resume')) == ['var.pt', 'var_tokens.pt']
    original_rendered = shapes.rendered

    def all_but_the_training_set(split, n, *args):
        assert (split, n) != ('train', 64), 'the resumed stage rendered its training set again'
        return original_rendered(split, n, *args)
    with monkeypatch.context() as patch:
        patch.setattr(shapes, 'rendered', all_but_the_training_set)
        pretrain.main(flags + ['--out', str(tmp_path / 'stopped')])
    assert os.listdir(tmp_path / 'stopped' / 'resume') == []  # a finished stage leaves no state and no tokens
    whole, resumed = (load_backbone(str(tmp_path / name))[1].state_dict() for name in ('whole', 'stopped'))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    trained_before = load_backbone(str(tiny_backbone_folder[0]))[1].state_dict()  # 2 steps, not 3
    assert not all(torch.equal(whole[k], trained_before[k]) for k in whole)


def test_the_clip_stage_sees_a_quarter_of_its_batch_as_the_vqvae_decodes_coarse_partial_sums(tiny_backbone_folder,
                                                                                             tmp_path, monkeypatch):
    vae, _ = load_backbone(str(tiny_backbone_folder[0]))
    x = shapes.to_input(shapes.rendered('test', 8, 0)[0])
    seen = pretrain.as_coarse_decodes(vae, x, np.random.default_rng(0))
    K = len(pretrain.PATCH_NUMS)
    scales = np.random.default_rng(0).integers(pretrain.KAPPA - 1, K - 1, len(x))  # the same draw: kappa..K-1, 1-based
    with torch.no_grad():
        partial = [vae.fhat_to_img(f_hat).float().clamp(-1, 1) for f_hat in vae.img_to_partial_sums(x)]
    for b, k in enumerate(scales):
        assert torch.allclose(seen[b], partial[k][b], atol=1e-5)
    assert len(set(scales.tolist())) > 1 and not torch.allclose(seen, partial[-1], atol=1e-3)  # never the full one
    # in the stage, a quarter of each batch goes through it and the rest is left as rendered
    calls = []
    original = pretrain.as_coarse_decodes
    monkeypatch.setattr(pretrain, 'as_coarse_decodes', 
                        lambda vae, x, rng: calls.append(len(x)) or original(vae, x, rng))
    monkeypatch.setattr(pretrain, 'evaluate_clip', lambda args: {'G2_met': False})
    out = tmp_path / 'copy'
    shutil.copytree(tiny_backbone_folder[0], out, ignore=shutil.ignore_patterns('clip'))
    pretrain.main(['--stage', 'clip', '--out', str(out), *TINY, '--clip_steps', '1'])
    assert calls == [2]  # --clip_batch 8
    assert os.path.isfile(out / 'clip' / 'open_clip_model.safetensors')


def test_a_coarse_partial_sum_is_the_quantizers_own_and_trains_codes_phis_and_encoder(tiny_backbone_folder):
    vae = load_backbone(str(tiny_backbone_folder[0]))[0].float()
    f = vae.quant_conv(vae.encoder(shapes.to_input(shapes.rendered('test', 4)[0]))).detach().requires_grad_(True)
    scale_B = torch.tensor([0, 2, 4, 3])  # 0-based, below the last scale
    coarse = pretrain.coarse_partial_sums(vae.quantize, f, scale_B)
    f_hats = vae.quantize.residual_quantize(f)[1]
    for b, k in enumerate(scale_B.tolist()):
        assert torch.allclose(coarse[b], f_hats[k][b], atol=1e-5)  # the straight-through adds nothing forward
    coarse.square().sum().backward()
    assert f.grad.abs().sum() > 0 and vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(phi.weight.grad is not None for phi in vae.quantize.quant_resi.qresi_ls[:2])  # coarse scales' phis


def test_autocast_follows_the_resolved_dtype():
    layer = torch.nn.Linear(4, 4)
    cpu = torch.device('cpu')
    with pretrain.autocast(argparse.Namespace(device=cpu, dtype=torch.bfloat16)):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with pretrain.autocast(argparse.Namespace(device=cpu, dtype=torch.float32)):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
