// Compiles engine/cuda_kernels.cu as plain C++ on the CPU (g++ -include tests/cuda_emulation.h):
// a kernel becomes an ordinary function that runs the grid-stride loop of one (block, thread)
// of the launch set with flatnet_launch(); calling it for every block and thread of a grid
// runs the whole launch, sequentially. Used by tests/emulated_cupy.py and tests/test_cuda.py.
#include <math.h>  // expf, logf and fmaf of the kernels
#define FLATNET_EMULATION 1
#define KERNEL extern "C" void

struct flatnet_dim3 { unsigned int x, y, z; };
static flatnet_dim3 blockIdx, threadIdx, blockDim, gridDim;

extern "C" void flatnet_launch(unsigned int block, unsigned int thread, unsigned int block_dim, unsigned int grid_dim)
{
    blockIdx.x = block; threadIdx.x = thread; blockDim.x = block_dim; gridDim.x = grid_dim;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
    blockDim.y = blockDim.z = gridDim.y = gridDim.z = 1;
}
