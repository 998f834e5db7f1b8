import time, torch, sys, warnings, importlib.util
warnings.filterwarnings("ignore")
sys.path.insert(0, '.')
spec=importlib.util.spec_from_file_location('b','bench/bench_random_walk.py'); b=importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from caee.random_walk import transition_matrix, _transposed_csr, random_walk
scores, aff, f, t = b.make_inputs('cpu')
n = 63*63
def tm(fn, r=9):
    ts=[]
    for _ in range(r):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[r//2]
T = transition_matrix(aff, f, t, n)
print('threads', torch.get_num_threads(), T.ccol_indices().dtype)
print('build T %.4f' % tm(lambda: transition_matrix(aff, f, t, n)))
print('bench inputs rw %.4f' % tm(lambda: random_walk(scores, T)))
print('full %.4f' % tm(lambda: random_walk(scores, transition_matrix(aff, f, t, n))))
print('random scores %.4f' % tm(lambda: random_walk(torch.rand_like(scores), T)))
print('random aff %.4f' % tm(lambda: random_walk(scores, transition_matrix(torch.rand_like(aff), f, t, n))))
print('set_flush_denormal', torch.set_flush_denormal(True))
print('bench inputs ftz %.4f' % tm(lambda: random_walk(scores, T)))
