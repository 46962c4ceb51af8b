## golden file: `shardwise estimate llama-3.1-8b --export megatron` for the plan in tests/test_export.py;
## every '##' line cites where the field below it is defined (the test drops them)
#!/bin/bash
# Megatron-LM pretrain_gpt.py, written by shardwise: dp8 tp4 pp2 zero1 mbs1 ga16 interleaved/v2 sp rc-full
## torchrun (torch.distributed.run): --nnodes --nproc-per-node --rdzv-backend --rdzv-endpoint
torchrun --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500 pretrain_gpt.py \
## Megatron-LM megatron/training/arguments.py: _add_distributed_args
    --tensor-model-parallel-size 4 \
## Megatron-LM megatron/training/arguments.py: _add_distributed_args
    --pipeline-model-parallel-size 2 \
## Megatron-LM megatron/training/arguments.py: _add_distributed_args (interleaved 1F1B)
    --num-layers-per-virtual-pipeline-stage 8 \
## Megatron-LM megatron/training/arguments.py: _add_distributed_args
    --sequence-parallel \
## Megatron-LM megatron/training/arguments.py: _add_distributed_args (optimizer states sharded over dp: ZeRO-1)
    --use-distributed-optimizer \
## Megatron-LM megatron/training/arguments.py: _add_training_args
    --micro-batch-size 1 \
## Megatron-LM megatron/training/arguments.py: _add_training_args
    --global-batch-size 128 \
## Megatron-LM megatron/training/arguments.py: _add_training_args (full | selective)
    --recompute-granularity full \
## Megatron-LM megatron/training/arguments.py: _add_training_args (uniform | block)
    --recompute-method uniform \
## Megatron-LM megatron/training/arguments.py: _add_training_args
    --recompute-num-layers 1 \
## Megatron-LM megatron/training/arguments.py: _add_training_args (adam | sgd; adam applies decoupled weight decay)
    --optimizer adam \
## Megatron-LM megatron/training/arguments.py: _add_mixed_precision_args
    --bf16 \
## Megatron-LM megatron/training/arguments.py: _add_training_args (AttnBackend: flash | fused | unfused | local | auto)
    --attention-backend flash \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --num-layers 32 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --hidden-size 4096 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --num-attention-heads 32 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --ffn-hidden-size 14336 \
## Megatron-LM megatron/training/arguments.py: _add_data_args
    --seq-length 2048 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --max-position-embeddings 131072 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args (LayerNorm | RMSNorm)
    --normalization RMSNorm \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args (learned_absolute | rope)
    --position-embedding-type rope \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --group-query-attention \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --num-query-groups 8 \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --swiglu \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --untie-embeddings-and-output-weights \
## Megatron-LM megatron/training/arguments.py: _add_network_size_args
    --disable-bias-linear \
## Megatron-LM megatron/training/arguments.py: _add_tokenizer_args (NullTokenizer: a vocabulary of --vocab-size)
    --tokenizer-type NullTokenizer \
## Megatron-LM megatron/training/arguments.py: _add_tokenizer_args
    --vocab-size 128256 \
    "$@"  # data, tokenizer, checkpoint flags
