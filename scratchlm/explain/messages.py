"""Every explanation string of `scratchlm explain`, in English and Chinese, in one table.

One key holds both languages, so they stay in step by construction; tests check that every key has
both, with the same {placeholders}. Formulas and shapes are not here: they are mathematics, the same
in every language, and are built in walkthrough.py from the model's real numbers.
"""

from __future__ import annotations

LANGS = ("en", "zh")

MESSAGES: dict[str, dict[str, str]] = {
    # --- frame ---
    "intro": {
        "en": "One forward pass of the prompt {prompt} ({T} tokens), computed by the engine and recorded step by step. "
              "Layer {layer} is shown in detail (head {head} where a single head is shown); the other layers are summarised.",
        "zh": "对提示词 {prompt}（{T} 个词元）做一次前向计算，由引擎实际算出并逐步记录。"
              "第 {layer} 层会详细展示（需要单看一个注意力头时看第 {head} 个头），其余各层给出汇总。",
    },
    "label_formula": {"en": "formula", "zh": "公式"},
    "label_shapes": {"en": "shapes", "zh": "形状"},
    "label_values": {"en": "values", "zh": "数值"},
    "at_position": {"en": "at position {p} ({piece}):", "zh": "第 {p} 个位置（{piece}）："},
    "matrix_of_head": {"en": "head {h}, rows = query positions, columns = key positions:",
                       "zh": "第 {h} 个头，行 = 查询位置，列 = 键位置："},

    # --- 1. the model ---
    "step_model": {"en": "The model", "zh": "模型"},
    "col_letter": {"en": "letter", "zh": "字母"},
    "col_meaning": {"en": "meaning", "zh": "含义"},
    "col_value": {"en": "value", "zh": "数值"},
    "cfg_dim": {"en": "model dimension (width of every token vector)", "zh": "模型维度（每个词元向量的宽度）"},
    "cfg_layers": {"en": "layers", "zh": "层数"},
    "cfg_heads": {"en": "query heads", "zh": "查询头数"},
    "cfg_kv_heads": {"en": "key/value heads", "zh": "键/值头数"},
    "cfg_head_dim": {"en": "head dimension", "zh": "每个头的维度"},
    "cfg_ffn": {"en": "feed-forward hidden size", "zh": "前馈网络隐藏层大小"},
    "cfg_vocab": {"en": "vocabulary size", "zh": "词表大小"},
    "cfg_context": {"en": "context length (positions)", "zh": "上下文长度（位置数）"},
    "cfg_params": {"en": "parameters", "zh": "参数量"},
    "cfg_rope_theta": {"en": "RoPE base θ", "zh": "RoPE 底数 θ"},
    "arch_llama": {
        "en": "Llama architecture: RMSNorm, rotary position embeddings (RoPE) inside attention, grouped-query "
              "attention (several query heads share one key/value head) and a SwiGLU feed-forward network.",
        "zh": "Llama 架构：RMSNorm 归一化，在注意力内部使用旋转位置编码（RoPE），分组查询注意力"
              "（多个查询头共用一个键/值头），以及 SwiGLU 前馈网络。",
    },
    "arch_gpt2": {
        "en": "GPT-2 architecture: learned position embeddings added to the input, LayerNorm (with bias), "
              "multi-head attention with biases and a GELU feed-forward network.",
        "zh": "GPT-2 架构：把学习得到的位置向量加到输入上，LayerNorm 归一化（带偏置），"
              "带偏置的多头注意力，以及 GELU 前馈网络。",
    },
    "model_source": {"en": "Model: {source}.", "zh": "模型：{source}。"},

    # --- 2. tokens ---
    "step_tokens": {"en": "Tokenization: text → token ids", "zh": "分词：文本 → 词元 id"},
    "col_pos": {"en": "position", "zh": "位置"},
    "col_id": {"en": "id", "zh": "id"},
    "col_piece": {"en": "piece", "zh": "片段"},
    "tokens_note": {
        "en": "Byte-level BPE cuts the text into T = {T} tokens; every array below has T in its shape. "
              "A leading space belongs to the token after it.",
        "zh": "字节级 BPE 把文本切成 T = {T} 个词元；下面每个数组的形状里都有 T。词前面的空格属于后面那个词元。",
    },
    "tokens_bos": {"en": "The model wants a beginning-of-sequence token first: {piece}.",
                   "zh": "这个模型要求开头先放一个序列起始词元：{piece}。"},

    # --- 3. embedding ---
    "step_embedding": {"en": "Embedding: one row of the table per token", "zh": "词嵌入：每个词元取表中的一行"},
    "embedding_note": {
        "en": "Each id selects one row of the embedding table: a vector of D = {D} numbers. Nothing here knows the "
              "token's position yet.",
        "zh": "每个 id 从嵌入表中取出一行：一个含 D = {D} 个数的向量。此时还没有任何位置信息。",
    },
    "step_positions": {"en": "Learned positions (GPT-2)", "zh": "学习得到的位置向量（GPT-2）"},
    "positions_note": {
        "en": "GPT-2 adds a learned vector for each position to the token vector, once, at the input. Llama models "
              "instead rotate queries and keys inside every attention layer (RoPE).",
        "zh": "GPT-2 在输入处一次性地把每个位置的学习向量加到词元向量上；Llama 模型则在每个注意力层内部旋转查询和键（RoPE）。",
    },

    # --- 4. layer ---
    "step_layer": {"en": "Into layer {layer} (of {L})", "zh": "进入第 {layer} 层（共 {L} 层）"},
    "layer_note": {
        "en": "Each of the {L} layers reads the residual stream x, adds an attention update and then a feed-forward "
              "update to it. The next steps follow layer {layer}; the others do the same with their own weights.",
        "zh": "{L} 个层中的每一层都读取残差流 x，先加上注意力的更新，再加上前馈网络的更新。"
              "下面几步跟踪第 {layer} 层；其他层用各自的权重做同样的事。",
    },
    "step_attn_norm": {"en": "{norm} before attention (layer {layer})", "zh": "注意力之前的 {norm}（第 {layer} 层）"},
    "step_ffn_norm": {"en": "{norm} before the feed-forward network (layer {layer})",
                      "zh": "前馈网络之前的 {norm}（第 {layer} 层）"},
    "step_final_norm": {"en": "Final {norm}", "zh": "最后的 {norm}"},
    "norm_stats_rms": {"en": "√(mean(x²) + ε) = {rms}", "zh": "√(mean(x²) + ε) = {rms}"},
    "norm_stats_ln": {"en": "mean(x) = {mean}   √(var(x) + ε) = {std}", "zh": "mean(x) = {mean}   √(var(x) + ε) = {std}"},
    "rmsnorm_note": {
        "en": "RMSNorm divides each token vector by its root mean square, then scales every dimension by a learned "
              "weight w. Unlike LayerNorm it does not subtract the mean and has no bias.",
        "zh": "RMSNorm 把每个词元向量除以它的均方根，再用学到的权重 w 逐维缩放。与 LayerNorm 不同，它不减均值，也没有偏置。",
    },
    "layernorm_note": {
        "en": "LayerNorm centres each token vector (subtracts its mean), divides by its standard deviation, then "
              "applies a learned scale w and shift b.",
        "zh": "LayerNorm 先把每个词元向量中心化（减去均值），再除以标准差，最后乘以学到的缩放 w 并加上偏移 b。",
    },

    # --- 6. q k v ---
    "step_qkv": {"en": "Queries, keys and values, split into heads (layer {layer})",
                 "zh": "查询、键和值，并拆分成多个头（第 {layer} 层）"},
    "col_kv_head": {"en": "key/value head", "zh": "键/值头"},
    "col_query_heads": {"en": "query heads reading it", "zh": "读取它的查询头"},
    "gqa_note": {
        "en": "Grouped-query attention: {H} query heads but only {K} key/value heads, so each key/value head is "
              "shared by G = H/K = {G} query heads (the table). The KV cache is {G}× smaller than with one per head.",
        "zh": "分组查询注意力：有 {H} 个查询头，但只有 {K} 个键/值头，所以每个键/值头由 G = H/K = {G} 个查询头共用（见表）。"
              "这样 KV 缓存比每头一份小 {G} 倍。",
    },
    "mha_note": {"en": "Multi-head attention: each of the {H} query heads has its own key/value head.",
                 "zh": "多头注意力：{H} 个查询头中每个都有自己的键/值头。"},
    "head_note": {"en": "Query head {h} reads key/value head {kv} = {h} // G.",
                  "zh": "第 {h} 个查询头读取第 {kv} 个键/值头（{kv} = {h} // G）。"},

    # --- 7. RoPE ---
    "step_rope": {"en": "RoPE: rotate queries and keys by position (layer {layer})",
                  "zh": "RoPE：按位置旋转查询和键（第 {layer} 层）"},
    "col_position": {"en": "position m", "zh": "位置 m"},
    "rope_pair_value": {"en": "pair 0 of q at position {p}, head {h}, before → after:",
                        "zh": "第 {p} 个位置、第 {h} 个头的 q 的第 0 对数，旋转前 → 旋转后："},
    "rope_length": {"en": "length before {before}, after {after}: a rotation keeps the length",
                    "zh": "旋转前长度 {before}，旋转后 {after}：旋转不改变长度"},
    "rope_note": {
        "en": "Each head vector is cut into pairs; pair i at position m is rotated by the angle m·θ_i. Early pairs "
              "turn fast, late pairs slowly. Keys are rotated the same way, so the score q·k depends on how far apart "
              "two positions are, not on where they are.",
        "zh": "每个头的向量被分成若干对；位置 m 上的第 i 对旋转角度 m·θ_i。前面的对转得快，后面的对转得慢。"
              "键也做同样的旋转，因此 q·k 的得分只取决于两个位置相隔多远，而不取决于它们在哪里。",
    },
    "rope_pairs_note": {
        "en": "The pairs are (0,1), (2,3), … of each {Hd}-wide head (Meta's layout, also GGUF's). Hugging Face files "
              "pair dimension i with i+{half}; scratchlm reorders their rows once, at load time.",
        "zh": "每个宽度为 {Hd} 的头按 (0,1)、(2,3)… 两两配对（Meta 的布局，GGUF 也是）。Hugging Face 文件把第 i 维与第 i+{half} 维配对；"
              "scratchlm 在加载时一次性地重排这些行。",
    },
    "rope_scaling_note": {"en": "This model rescales the frequencies ({kind}) to reach a longer context.",
                          "zh": "这个模型对频率做了缩放（{kind}），以支持更长的上下文。"},

    # --- 8-11. attention ---
    "step_scores": {"en": "Attention scores: q·kᵀ / √Hd (layer {layer})", "zh": "注意力得分：q·kᵀ / √Hd（第 {layer} 层）"},
    "score_by_hand": {
        "en": "by hand: {q}[{p}, head {h}]·{k}[{s}, kv head {kv}] / √Hd = {value}   (recorded: {recorded})",
        "zh": "手算：{q}[{p}, 头 {h}]·{k}[{s}, 键/值头 {kv}] / √Hd = {value}   （记录值：{recorded}）",
    },
    "scores_note": {
        "en": "Every query is compared with every key by a dot product. Dividing by √Hd keeps the scores in a range "
              "where softmax is not saturated. The {G} query heads of a group use the same keys.",
        "zh": "每个查询与每个键做点积比较。除以 √Hd 让得分保持在 softmax 不饱和的范围内。同一组的 {G} 个查询头使用同样的键。",
    },
    "scores_masked_note": {
        "en": "The recorded scores already include the causal mask of the next step: entries above the diagonal are −inf.",
        "zh": "记录下来的得分已经加上了下一步的因果掩码：对角线以上的元素是 −inf。",
    },
    "step_mask": {"en": "Causal mask", "zh": "因果掩码"},
    "mask_note": {
        "en": "A token may look at itself and at earlier tokens, never at later ones: −∞ becomes probability 0 after "
              "softmax. With a KV cache and a single new token, no mask is needed (every cached token is earlier).",
        "zh": "一个词元只能看自己和前面的词元，不能看后面的：−∞ 经过 softmax 变成概率 0。"
              "使用 KV 缓存且一次只处理一个新词元时不需要掩码（缓存里的词元都在前面）。",
    },
    "step_softmax": {"en": "Softmax: scores → attention weights (layer {layer})",
                     "zh": "Softmax：得分 → 注意力权重（第 {layer} 层）"},
    "row_sum": {"en": "row {p} sums to {total}", "zh": "第 {p} 行之和为 {total}"},
    "softmax_note": {"en": "Each row becomes a probability distribution over the positions it may see.",
                     "zh": "每一行都变成对它能看到的位置的概率分布。"},
    "attends_most": {
        "en": "Head {h} at position {p} ({piece}) attends most to position {s} ({spiece}), weight {prob}.",
        "zh": "第 {h} 个头在第 {p} 个位置（{piece}）最关注第 {s} 个位置（{spiece}），权重 {prob}。",
    },
    "step_weighted": {"en": "Weighted sum of the values (layer {layer})", "zh": "对值做加权求和（第 {layer} 层）"},
    "weighted_note": {
        "en": "Each head's output at a position is the average of the value vectors it attends to, weighted by the "
              "attention probabilities.",
        "zh": "每个头在一个位置上的输出，是它所关注的值向量按注意力概率加权的平均。",
    },
    "step_wo": {"en": "Output projection: heads back to the model dimension (layer {layer})",
                "zh": "输出投影：把各个头拼回模型维度（第 {layer} 层）"},
    "wo_note": {"en": "The H head outputs are concatenated and mixed by one matrix Wo into a D-wide update.",
                "zh": "把 H 个头的输出拼接起来，用一个矩阵 Wo 混合成宽度为 D 的更新。"},
    "step_residual": {"en": "Residual connection after attention (layer {layer})",
                      "zh": "注意力之后的残差连接（第 {layer} 层）"},
    "residual_note": {
        "en": "The attention output is added to the stream instead of replacing it, so every layer makes a small "
              "correction and information from the embedding survives to the top.",
        "zh": "注意力输出是加到残差流上，而不是替换它；因此每一层只做一点修正，来自嵌入的信息可以一直保留到顶层。",
    },

    # --- 15-16. feed-forward ---
    "step_ffn_swiglu": {"en": "SwiGLU feed-forward network (layer {layer})", "zh": "SwiGLU 前馈网络（第 {layer} 层）"},
    "swiglu_note": {
        "en": "Each position separately: two projections up to F = {F}; silu of the gate decides how much of each "
              "'up' feature passes; W2 brings the result back to D = {D}.",
        "zh": "每个位置各自计算：两个投影升到 F = {F} 维；门控的 silu 决定每个 up 特征通过多少；W2 再把结果降回 D = {D} 维。",
    },
    "step_ffn_gelu": {"en": "GELU feed-forward network (layer {layer})", "zh": "GELU 前馈网络（第 {layer} 层）"},
    "gelu_note": {
        "en": "Each position separately: up to F = {F}, a smooth GELU non-linearity, back down to D = {D}.",
        "zh": "每个位置各自计算：升到 F = {F} 维，经过平滑的 GELU 非线性，再降回 D = {D} 维。",
    },
    "step_residual2": {"en": "Residual connection after the feed-forward network: layer {layer}'s output",
                       "zh": "前馈网络之后的残差连接：第 {layer} 层的输出"},
    "layer_out_note": {"en": "This x is the output of layer {layer} and the input of the next layer.",
                       "zh": "这个 x 就是第 {layer} 层的输出，也是下一层的输入。"},

    # --- 17. all layers ---
    "step_layers": {"en": "All {L} layers, summarised", "zh": "全部 {L} 层汇总"},
    "col_layer": {"en": "layer", "zh": "层"},
    "col_rms_in": {"en": "rms(x) in", "zh": "输入 rms(x)"},
    "col_rms_attn": {"en": "rms(attention)", "zh": "rms(注意力)"},
    "col_rms_ffn": {"en": "rms(ffn)", "zh": "rms(前馈)"},
    "col_rms_out": {"en": "rms(x) out", "zh": "输出 rms(x)"},
    "col_lens": {"en": "logit lens: top token (p)", "zh": "logit lens：最可能的词元 (p)"},
    "layers_note": {
        "en": "Measured at the last position {p} ({piece}). The logit lens applies the final norm and the output "
              "head to each layer's output: the token the model would predict if it stopped there. "
              "* marks layer {layer}, shown in detail above.",
        "zh": "在最后一个位置 {p}（{piece}）上测量。logit lens 把最后的归一化和输出头直接用在每一层的输出上："
              "即模型如果在这一层停下会预测的词元。* 标出上面详细展示的第 {layer} 层。",
    },

    # --- 19-20. output ---
    "step_output": {"en": "Output head: vectors → logits over the vocabulary", "zh": "输出头：向量 → 词表上的 logits"},
    "tied_note": {"en": "The output head is the embedding table itself (tied weights): a token scores high when its "
                        "embedding points the same way as the final vector.",
                  "zh": "输出头就是嵌入表本身（权重共享）：一个词元的嵌入与最终向量方向越一致，它的得分越高。"},
    "untied_note": {"en": "The output head is its own matrix Wout, one row per vocabulary token.",
                    "zh": "输出头是单独的矩阵 Wout，词表中每个词元对应一行。"},
    "output_note": {
        "en": "Every position gets logits for the token after it; generating text uses only the last one "
              "(position {p}). The others are what training compares with the real next tokens.",
        "zh": "每个位置都会得到其后一个词元的 logits；生成文本时只用最后一个（第 {p} 个位置）。其余位置是训练时与真实下一个词元比较的部分。",
    },
    "step_top": {"en": "The {k} most likely next tokens", "zh": "最可能的 {k} 个下一个词元"},
    "col_rank": {"en": "rank", "zh": "排名"},
    "col_logit": {"en": "logit", "zh": "logit"},
    "col_prob": {"en": "probability", "zh": "概率"},
    "top_note": {"en": "The model's best guess for the next token is {piece}, with probability {prob}.",
                 "zh": "模型对下一个词元的最佳猜测是 {piece}，概率为 {prob}。"},

    # --- report ---
    "report_title": {"en": "scratchlm explain: one forward pass", "zh": "scratchlm explain：一次前向计算"},
    "report_footer": {"en": "Generated by scratchlm from a real run; all values were recorded from the engine's own forward pass.",
                      "zh": "由 scratchlm 根据一次真实运行生成；所有数值都记录自引擎自身的前向计算。"},
    "report_written": {"en": "Report written to {path}", "zh": "报告已写入 {path}"},
    "report_hint": {"en": "Add --out DIR for a report with pictures (attention heatmaps, RoPE, logit lens, KV cache).",
                    "zh": "加上 --out DIR 可生成带图的报告（注意力热力图、RoPE、logit lens、KV 缓存）。"},
    "kv_measuring": {"en": "Timing {n} decode steps with and without the KV cache…",
                     "zh": "正在测量有无 KV 缓存时的 {n} 个解码步骤……"},
    "meta_model": {"en": "model", "zh": "模型"},
    "meta_arch": {"en": "architecture", "zh": "架构"},
    "meta_prompt": {"en": "prompt", "zh": "提示词"},
    "meta_tokens": {"en": "tokens", "zh": "词元数"},
    "meta_layer_head": {"en": "layer / head shown", "zh": "展示的层 / 头"},
    "sec_next": {"en": "Next-token prediction", "zh": "下一个词元的预测"},
    "sec_steps": {"en": "Step by step", "zh": "逐步讲解"},
    "sec_pictures": {"en": "Pictures", "zh": "图示"},
    "sec_attention": {"en": "Attention of every head in layer {layer}", "zh": "第 {layer} 层每个头的注意力"},
    "cap_attention": {
        "en": "Attention probabilities of the {H} query heads of layer {layer} (rows: query position, columns: key "
              "position; the blank upper triangle is the causal mask). Heads are labelled with the key/value head "
              "they share ({K} in all); head {h} is highlighted.",
        "zh": "第 {layer} 层 {H} 个查询头的注意力概率（行：查询位置，列：键位置；右上方空白的三角是因果掩码）。"
              "每个头标注了它共用的键/值头（共 {K} 个）；第 {h} 个头高亮显示。",
    },
    "sec_rope": {"en": "RoPE rotation angles", "zh": "RoPE 旋转角度"},
    "cap_rope": {
        "en": "Left: the frequency θ_i of each pair. Middle: the rotation angle m·θ_i (wrapped to ±π) for every "
              "position and pair, from the cos/sin the forward used. Right: the angle by which pairs of query head {h} in layer {layer} "
              "were actually turned (angle after RoPE minus angle before, dots) against the line m·θ_i.",
        "zh": "左：每一对的频率 θ_i。中：每个位置、每一对的旋转角 m·θ_i（折回到 ±π），取自前向计算实际使用的 cos/sin。"
              "右：第 {layer} 层第 {h} 个查询头的若干对实际被转过的角度（RoPE 之后的角度减去之前的角度，圆点），与直线 m·θ_i 对照。",
    },
    "sec_positions": {"en": "Learned position embeddings", "zh": "学习得到的位置向量"},
    "cap_positions": {
        "en": "Left: cosine similarity between the position vectors of the prompt's positions. Right: their first "
              "dimensions.",
        "zh": "左：提示词各位置的位置向量之间的余弦相似度。右：这些向量的前若干维。",
    },
    "sec_lens": {"en": "Logit lens", "zh": "Logit lens"},
    "cap_lens": {
        "en": "For each layer (rows) and position (columns, last {n} at most), the token the final norm and output "
              "head give on that layer's output, shaded by its probability. The bottom row (the last layer) is the model's real prediction.",
        "zh": "对每一层（行）和每个位置（列，最多显示最后 {n} 个），把最后的归一化和输出头用在该层输出上得到的最可能词元，"
              "颜色深浅表示其概率。最下面一行（最后一层）就是模型真正的预测。",
    },
    "sec_kv": {"en": "The effect of the KV cache", "zh": "KV 缓存的效果"},
    "cap_kv": {
        "en": "Time per new token, decoding greedily after the prompt: with the cache each step computes one new "
              "row of keys and values per layer; without it every step recomputes the whole prefix.",
        "zh": "在提示词之后贪心解码时每个新词元的耗时：有缓存时每步只为每层计算一行新的键和值；没有缓存时每步都要重新计算整个前缀。",
    },
    "kv_summary": {
        "en": "Measured on this machine over {n} new tokens after a {T}-token prompt: median {with_ms} ms per token "
              "with the KV cache, {without_ms} ms without, {ratio}× faster (the prefill itself took {prefill_ms} ms).",
        "zh": "在本机上对 {T} 个词元的提示词之后的 {n} 个新词元测得：有 KV 缓存时每个词元耗时中位数 {with_ms} 毫秒，"
              "无缓存时 {without_ms} 毫秒，快 {ratio} 倍（预填充本身耗时 {prefill_ms} 毫秒）。",
    },
    "kv_same": {"en": "Both ways produced the same tokens.", "zh": "两种方式生成的词元完全相同。"},
    "kv_differ": {"en": "The two ways produced different tokens (rounding differences flipped a near-tie).",
                  "zh": "两种方式生成的词元不同（舍入误差改变了一个几乎并列的选择）。"},
    "col_seq_len": {"en": "positions seen", "zh": "可见位置数"},
    "col_ms_with": {"en": "ms with cache", "zh": "有缓存（毫秒）"},
    "col_ms_without": {"en": "ms without cache", "zh": "无缓存（毫秒）"},
    "col_ratio": {"en": "ratio", "zh": "倍数"},
    "col_token": {"en": "token", "zh": "词元"},

    # --- figure labels (drawn in Chinese only when a CJK font is installed) ---
    "fig_head": {"en": "head {h} (kv {kv})", "zh": "头 {h}（键/值 {kv}）"},
    "fig_prob": {"en": "probability", "zh": "概率"},
    "fig_attention_title": {"en": "Layer {layer}: attention probabilities per head", "zh": "第 {layer} 层：每个头的注意力概率"},
    "fig_pair_index": {"en": "pair index i", "zh": "配对序号 i"},
    "fig_position": {"en": "position m", "zh": "位置 m"},
    "fig_rope_freq": {"en": "frequency θ_i of each pair", "zh": "每一对的频率 θ_i"},
    "fig_rope_angles": {"en": "angle m·θ_i (wrapped to ±π)", "zh": "角度 m·θ_i（折回到 ±π）"},
    "fig_rope_pair": {"en": "rotation measured on q (layer {layer}, head {h})", "zh": "在 q 上测得的旋转角（第 {layer} 层，第 {h} 个头）"},
    "fig_rope_title": {"en": "RoPE: rotary position embeddings", "zh": "RoPE：旋转位置编码"},
    "fig_pos_similarity": {"en": "cosine similarity of position vectors", "zh": "位置向量的余弦相似度"},
    "fig_dim": {"en": "dimension (first {k})", "zh": "维度（前 {k} 维）"},
    "fig_pos_values": {"en": "position vectors", "zh": "位置向量"},
    "fig_positions_title": {"en": "Learned position embeddings", "zh": "学习得到的位置向量"},
    "fig_lens_x": {"en": "position: input token", "zh": "位置：输入词元"},
    "fig_layer": {"en": "layer", "zh": "层"},
    "fig_lens_title": {"en": "Logit lens: top next token after each layer", "zh": "Logit lens：每层之后最可能的下一个词元"},
    "fig_with_cache": {"en": "with KV cache", "zh": "有 KV 缓存"},
    "fig_without_cache": {"en": "without cache (recompute the prefix)", "zh": "无缓存（重算整个前缀）"},
    "fig_seq_len": {"en": "positions the new token sees", "zh": "新词元可见的位置数"},
    "fig_ms_per_token": {"en": "ms per new token", "zh": "每个新词元的毫秒数"},
    "fig_kv_title": {"en": "Decoding time per token", "zh": "每个词元的解码时间"},

    # --- the encoder-decoder (seq2seq.py) ---
    "s2s_intro": {
        "en": "The encoder-decoder reads the source {source} ({S} tokens), decodes an output, then runs one forward "
              "pass of (source, BOS + output), recorded step by step. Layer {layer} of each side is shown, head {head} "
              "where a single head is shown.",
        "zh": "编码器-解码器读入源文本 {source}（{S} 个词元），先解码出输出，再对（源文本，BOS + 输出）做一次前向计算并逐步记录。"
              "编码器和解码器各详细展示第 {layer} 层，需要单看一个注意力头时看第 {head} 个头。",
    },
    "s2s_step_model": {"en": "The encoder-decoder Transformer", "zh": "编码器-解码器 Transformer"},
    "s2s_cfg_enc_layers": {"en": "encoder layers", "zh": "编码器层数"},
    "s2s_cfg_dec_layers": {"en": "decoder layers", "zh": "解码器层数"},
    "s2s_cfg_source_len": {"en": "source positions", "zh": "源序列位置数"},
    "s2s_cfg_target_len": {"en": "target positions (BOS + output)", "zh": "目标序列位置数（BOS + 输出）"},
    "s2s_cfg_norm": {"en": "LayerNorm placement", "zh": "LayerNorm 的位置"},
    "s2s_cfg_embeddings": {"en": "embeddings", "zh": "嵌入表"},
    "s2s_pre_ln": {"en": "pre-LN: x + f(LN(x))", "zh": "前置 LN：x + f(LN(x))"},
    "s2s_post_ln": {"en": "post-LN as in the 2017 paper: LN(x + f(x))", "zh": "后置 LN（2017 年论文的做法）：LN(x + f(x))"},
    "s2s_shared": {"en": "one table for source, target and output", "zh": "源、目标和输出共用一张表"},
    "s2s_separate": {"en": "separate source, target and output tables", "zh": "源、目标和输出各用一张表"},
    "s2s_model_note": {
        "en": "The encoder turns the whole source into vectors at once; the decoder writes the output one token at a "
              "time, reading its own earlier tokens (causal self-attention) and the encoder's vectors (cross-attention).",
        "zh": "编码器一次性把整个源序列变成向量；解码器逐个词元地写出输出，既读自己之前写出的词元（因果自注意力），也读编码器的向量（交叉注意力）。",
    },
    "s2s_step_source": {"en": "Source tokens", "zh": "源序列词元"},
    "s2s_col_piece": {"en": "token", "zh": "词元"},
    "s2s_step_embed": {"en": "Embedding and sinusoidal positions", "zh": "嵌入与正弦位置编码"},
    "s2s_embed_note": {
        "en": "Attention alone does not know word order, so each position adds a fixed pattern of sines and cosines of "
              "different wavelengths; there is nothing to learn in it. The √D brings the small embedding rows to the scale of PE.",
        "zh": "注意力本身不知道词序，所以每个位置都加上一组不同波长的正弦和余弦，这部分是固定的，不需要学习。乘以 √D 是为了让较小的嵌入向量与位置编码的量级相当。",
    },
    "s2s_step_encoder": {"en": "Encoder layer {layer}: self-attention over the source", "zh": "编码器第 {layer} 层：源序列上的自注意力"},
    "s2s_encoder_note": {
        "en": "Every source position may look at every other one (no causal mask); only padding positions of a batch "
              "are masked out. Residual-stream size after each layer:",
        "zh": "每个源位置都可以看所有其他位置（没有因果掩码）；只有批次中的填充位置被屏蔽。各层输出后残差流的大小：",
    },
    "s2s_enc_layer_rms": {"en": "encoder layer {i}: rms {rms}", "zh": "编码器第 {i} 层：均方根 {rms}"},
    "s2s_step_memory": {"en": "The encoder's output: the memory", "zh": "编码器的输出：记忆（memory）"},
    "s2s_memory_note": {
        "en": "Computed once per source; each of the {L} decoder layers projects it to its own keys and values.",
        "zh": "每个源序列只算一次；解码器的 {L} 层各自把它投影成自己的键和值。",
    },
    "s2s_step_decoder": {"en": "Decoder layer {layer}: causal self-attention", "zh": "解码器第 {layer} 层：因果自注意力"},
    "s2s_decoder_note": {
        "en": "A target position sees only itself and earlier positions (the causal mask's -inf above the diagonal), "
              "so training can score every position of a target in one pass without letting it read the answer.",
        "zh": "目标位置只能看到自己和之前的位置（因果掩码在对角线上方是 -inf），所以训练时可以一次计算目标序列所有位置的损失，而不会让模型偷看答案。",
    },
    "s2s_step_cross": {"en": "Decoder layer {layer}: cross-attention to the source", "zh": "解码器第 {layer} 层：对源序列的交叉注意力"},
    "s2s_cross_rows": {"en": "head {h}, rows = target positions (what the decoder has read), columns = source positions:",
                       "zh": "第 {h} 个头，行 = 目标位置（解码器已读入的词元），列 = 源位置："},
    "s2s_col_reads": {"en": "after reading", "zh": "读入"},
    "s2s_col_looks_at": {"en": "looks most at", "zh": "最关注的源词元"},
    "s2s_col_weight": {"en": "weight", "zh": "权重"},
    "s2s_cross_note": {
        "en": "Queries come from the decoder, keys and values from the memory: this is where the output reads the source. "
              "The table gives, for each row, the source token this head weighs most; other heads and layers "
              "(--head, --layer) divide the work differently.",
        "zh": "查询来自解码器，键和值来自记忆：输出正是在这里读取源序列。表中列出每一行在这个头里权重最大的源词元；"
              "其他头和层（--head、--layer）的分工各不相同。",
    },
    "s2s_step_output": {"en": "Output probabilities, position by position", "zh": "逐个位置的输出概率"},
    "s2s_col_after": {"en": "after", "zh": "读入后"},
    "s2s_col_chosen": {"en": "wrote", "zh": "写出"},
    "s2s_col_top": {"en": "most likely", "zh": "最可能的词元"},
    "s2s_output_note": {
        "en": "The decoded output is {out} (beam width {beam}; 1 = greedy). Decoding stops at the end token.",
        "zh": "解码结果是 {out}（束宽 {beam}；1 表示贪心解码）。遇到结束词元时停止。",
    },
    "s2s_fig_head": {"en": "head {h}", "zh": "第 {h} 个头"},
    "s2s_fig_cross_title": {"en": "Cross-attention of decoder layer {layer} (rows: target, columns: source)",
                            "zh": "解码器第 {layer} 层的交叉注意力（行：目标，列：源）"},
    "s2s_png_written": {"en": "cross-attention maps written to {path}", "zh": "交叉注意力图已写入 {path}"},
}


def msg(key: str, lang: str, **kwargs) -> str:
    """The message `key` in `lang` ("en" or "zh"), with its {placeholders} filled."""
    return MESSAGES[key][lang].format(**kwargs)
