/* The CPU kernels of the operators maas::int8_matmul and maas::paged_decode_attention, in C++
   (torch_ops.py declares them and builds this file, with int8_matmul.c and
   paged_attention.c, against the torch it runs in).

   A compiled decode step calls each operator through PyTorch's dispatcher, about 150 times a
   step for a 30-layer model. A kernel written in Python (the ``_run`` functions of
   int8_matmul.py and paged_attention.py, which eager steps call directly) costs about 7 us
   more a call there than this one: 13.1 against 5.9 us a product and its quantising in a
   compiled loop. The checks are the Python kernels', with the same messages and kinds
   (TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_INDEX IndexError). */

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

extern "C" {
int int8_row_matmul(const int8_t *x, const int8_t *w, const int32_t *sums, int32_t *out,
                    int64_t rows, int64_t outputs, int64_t inputs, int threads, int level);
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, const int64_t *lengths, void *out,
                           int q_bf16, int cache_bf16, int64_t sequences, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, int64_t cache_blocks,
                           int64_t block_size, int64_t table_width, int threads);

/* Products of more rows, or of longer ones, go to at::_int_mm: set by int8_matmul.py
   (rows_max, LONGEST) when it loads this library; until then every product does. */
static int64_t int8_rows_max = 0, int8_longest = 0;

void maas_set_int8_limits(int64_t rows_max, int64_t longest) {
    int8_rows_max = rows_max;
    int8_longest = longest;
}
}

namespace {

bool is_float(const at::Tensor &t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

at::Tensor int8_matmul(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &sums) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kChar && weight.scalar_type() == at::kChar,
                      "int8 rows and weights, not ", x.scalar_type(), " and ",
                      weight.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "rows ",
                      x.sizes(), " do not match weights ", weight.sizes());
    TORCH_CHECK_VALUE(sums.scalar_type() == at::kInt && sums.dim() == 1 &&
                          sums.size(0) == weight.size(0),
                      "row sums are int32 [", weight.size(0), "], not ", sums.scalar_type(), " ",
                      sums.sizes());
    TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(),
                      "the int8 kernel runs on the CPU");
    if (x.size(0) > int8_rows_max || x.size(1) > int8_longest) return at::_int_mm(x, weight.t());
    const at::Tensor rows = x.contiguous(), codes = weight.contiguous(), sum = sums.contiguous();
    at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kInt));
    const int status = int8_row_matmul(rows.data_ptr<int8_t>(), codes.data_ptr<int8_t>(),
                                       sum.data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                                       x.size(0), weight.size(0), weight.size(1),
                                       at::get_num_threads(), -1);
    TORCH_CHECK(status == 0, "the int8 kernel ran out of memory");
    return out;
}

at::Tensor paged_attention(const at::Tensor &q, const at::Tensor &k_cache,
                           const at::Tensor &v_cache, const at::Tensor &block_tables,
                           const at::Tensor &lengths) {
    TORCH_CHECK_VALUE(k_cache.scalar_type() == v_cache.scalar_type() && is_float(q) &&
                          is_float(k_cache),
                      "paged attention takes float32 or bfloat16, not ", q.scalar_type(),
                      " queries over a ", k_cache.scalar_type(), " and ", v_cache.scalar_type(),
                      " cache");
    TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                      "queries and cache do not match");
    const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1);
    const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
    const int64_t sequences = q.size(0), heads = q.size(1);
    TORCH_CHECK_VALUE(heads % kv_heads == 0 && q.size(2) == head_dim,
                      "queries and cache do not match");
    TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == sequences,
                      "block_tables must be [sequences, blocks]");
    TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == sequences,
                      "lengths must be [sequences]");
    for (const at::Tensor *t : {&q, &k_cache, &v_cache, &block_tables, &lengths})
        TORCH_CHECK_VALUE(t->device().is_cpu(), "paged attention runs on the CPU");
    TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(),
                      "the KV cache must be contiguous");
    const at::Tensor queries = q.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor length = lengths.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(queries);
    const int status = paged_decode_attention(
        queries.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr<int64_t>(),
        length.data_ptr<int64_t>(), out.data_ptr(), q.scalar_type() == at::kBFloat16,
        k_cache.scalar_type() == at::kBFloat16, sequences, heads, kv_heads, head_dim, blocks,
        block_size, tables.size(1), at::get_num_threads());
    TORCH_CHECK_INDEX(status != -2, "a sequence's length or block ids lie outside the KV cache");
    TORCH_CHECK(status == 0, "paged attention ran out of memory");
    return out;
}

} // namespace

TORCH_LIBRARY_IMPL(maas, CPU, m) {
    m.impl("int8_matmul", &int8_matmul);
    m.impl("paged_decode_attention", &paged_attention);
}
