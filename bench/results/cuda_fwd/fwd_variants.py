# Forward-only timing of the compiled forward (overlapped and serial order) against the Triton forward.
# Used at commit e7f051e, where MODA_CUDA_FWD_SERIAL selected the serial order: python fwd_variants.py
import os, torch, triton, moda_cuda
for (T,Hq,Hk,D,L) in [(16384,64,8,64,64),(8192,32,8,128,32),(4096,64,8,64,64)]:
    q=torch.randn(1,T,Hq,D,device="cuda",dtype=torch.bfloat16); k=torch.randn(1,T,Hk,D,device="cuda",dtype=torch.bfloat16); v=torch.randn_like(k)
    dk=torch.randn(1,T,L,Hk,D,device="cuda",dtype=torch.bfloat16); dv=torch.randn_like(dk)
    r={}
    for name,env in (("cuda","0"),("cuda_serial","1"),("triton",None)):
        os.environ["MODA_CUDA_FWD_SERIAL"]=env or "0"
        b="triton" if env is None else "cuda"
        r[name]=triton.testing.do_bench(lambda: moda_cuda.moda_attention(q,k,v,dk,dv,backend=b),warmup=200,rep=1000,return_mode="median")
    fl=4*Hq*D*(T*(T+1)/2+T*L)
    print(T,Hq,Hk,D,L," ".join(f"{n} {t:.3f}ms {fl/t/1e9:.0f}TF" for n,t in r.items()),flush=True)
