"""Evaluation helpers: target-weighted metrics, identical for dense and sparse MLM heads."""

import pytest
import torch

from tutorial_lib import MaskedLM, SequenceClassifier, TransformerConfig
from tutorial_lib.data.batching import ClassificationCollator, MLMCollator
from tutorial_lib.training.evaluation import classification_metrics, fixed_batches, masked_lm_metrics

CONFIG = TransformerConfig.preset("tiny", vocab_size=60)


def mlm_batches():
    collator = MLMCollator(mask_id=4, vocab_size=60, special_ids={0, 1, 2, 3, 4}, pad_id=0,
                           mlm_probability=0.3)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": [2, *torch.randint(5, 60, (n,), generator=generator).tolist(), 3]}
                for n in (5, 9, 3, 12, 7)]
    return fixed_batches(examples, collator, batch_size=2, seed=1)


def test_fixed_batches_are_reproducible():
    first, second = mlm_batches(), mlm_batches()
    assert len(first) == 3
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_masked_lm_metrics_match_a_manual_count_and_the_sparse_head():
    torch.manual_seed(0)
    dense = MaskedLM(CONFIG).eval()
    sparse = MaskedLM(CONFIG, sparse_prediction=True).eval()
    sparse.load_state_dict(dense.state_dict())
    batches = mlm_batches()
    correct = total = 0
    losses = []
    for batch in batches:
        with torch.no_grad():
            logits = dense(batch["input_ids"], batch["attention_mask"]).logits
        targets = batch["labels"] != -100
        correct += int((logits.argmax(-1)[targets] == batch["labels"][targets]).sum())
        total += int(targets.sum())
        losses.append(torch.nn.functional.cross_entropy(logits[targets], batch["labels"][targets],
                                                        reduction="sum"))
    metrics = masked_lm_metrics(dense, batches)
    assert metrics["masked_tokens"] == total > 0
    assert metrics["mlm_accuracy"] == pytest.approx(correct / total)
    assert metrics["mlm_loss"] == pytest.approx(float(sum(losses)) / total, rel=1e-5)
    assert masked_lm_metrics(sparse, batches) == pytest.approx(metrics, rel=1e-5)


def test_classification_metrics_and_mode_is_restored():
    torch.manual_seed(0)
    model = SequenceClassifier(CONFIG, num_labels=2).train()
    examples = [{"input_ids": [2, 7 + i, 9, 3], "token_type_ids": [0] * 4, "label": i % 2}
                for i in range(7)]
    batches = fixed_batches(examples, ClassificationCollator(pad_id=0), batch_size=3)
    metrics = classification_metrics(model, batches)
    assert model.training  # evaluation does not leave the model in eval mode
    model.eval()
    predictions = torch.cat([model(**b).logits.argmax(-1) for b in batches])
    labels = torch.tensor([e["label"] for e in examples])
    assert metrics["examples"] == 7
    assert metrics["accuracy"] == pytest.approx(float((predictions == labels).float().mean()))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fixed_batches(examples, ClassificationCollator(pad_id=0), batch_size=0)
