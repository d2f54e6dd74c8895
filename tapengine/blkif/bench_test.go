package blkif

import "testing"

func BenchmarkDecodeRequest(b *testing.B) {
	for _, p := range []Protocol{X86_32, X86_64} {
		b.Run(p.String(), func(b *testing.B) {
			buf := make([]byte, p.RequestSize())
			r := Request{Op: OpWrite, NrSegments: 11, ID: 7, Sector: 99}
			for i := range r.Seg {
				r.Seg[i] = Segment{Gref: uint32(i), LastSect: 7}
			}
			p.EncodeRequest(buf, &r)
			var out Request
			b.ReportAllocs()
			for b.Loop() {
				p.DecodeRequest(buf, &out)
			}
		})
	}
}

func BenchmarkEncodeRequest(b *testing.B) {
	buf := make([]byte, 112)
	r := Request{Op: OpRead, NrSegments: 11, ID: 7, Sector: 99}
	b.ReportAllocs()
	for b.Loop() {
		X86_64.EncodeRequest(buf, &r)
	}
}

func BenchmarkEncodeResponse(b *testing.B) {
	buf := make([]byte, 16)
	r := Response{ID: 7, Op: OpRead}
	b.ReportAllocs()
	for b.Loop() {
		X86_64.EncodeResponse(buf, &r)
	}
}
