package vmdk

// Info is what `image info` prints about a VMDK.
type Info struct {
	Format        string       `json:"format"` // "vmdk"
	VirtualSize   int64        `json:"virtual_size"`
	CreateType    string       `json:"create_type"` // subformat; "" for a bare sparse extent
	CID           uint32       `json:"cid"`
	ParentCID     uint32       `json:"parent_cid"`
	BackingFile   string       `json:"backing_file,omitempty"` // parentFileNameHint as stored
	BackingFormat string       `json:"backing_format,omitempty"`
	ClusterSize   int64        `json:"cluster_size,omitempty"` // grain of the first sparse extent
	AdapterType   string       `json:"adapter_type,omitempty"`
	HWVersion     string       `json:"hw_version,omitempty"`
	Dirty         bool         `json:"dirty"` // uncleanShutdown set in a sparse header
	ReadOnly      bool         `json:"read_only"`
	Extents       []ExtentInfo `json:"extents"`
}

// ExtentInfo describes one extent.
type ExtentInfo struct {
	Filename    string `json:"filename"`
	Type        string `json:"type"` // SPARSE, FLAT, ZERO, VMFS
	Access      string `json:"access"`
	VirtualSize int64  `json:"virtual_size"`
	Offset      int64  `json:"offset,omitempty"` // byte offset into a flat file
	Version     uint32 `json:"version,omitempty"`
	GrainSize   int64  `json:"grain_size,omitempty"`
	Compressed  bool   `json:"compressed,omitempty"`
	ZeroedGrain bool   `json:"zeroed_grain,omitempty"`
	RedundantGD bool   `json:"redundant_gd,omitempty"`
}

// Info reports the image's metadata.
func (img *Image) Info() Info {
	in := Info{Format: "vmdk", VirtualSize: img.size, ReadOnly: img.readOnly, ParentCID: noParentCID}
	if d := img.desc; d != nil {
		in.CreateType, in.CID, in.ParentCID = d.CreateType, img.cid.Load(), d.ParentCID
		in.AdapterType = d.DDB["ddb.adapterType"]
		in.HWVersion = d.DDB["ddb.virtualHWVersion"]
	}
	in.BackingFile, in.BackingFormat = img.BackingFile()
	for _, e := range img.extents {
		x := ExtentInfo{Filename: e.d.File, Type: e.d.Type, Access: e.d.Access, VirtualSize: e.length, Offset: e.off}
		if sp := e.sp; sp != nil {
			h := sp.h
			x.Version = h.Version
			x.GrainSize = h.grainBytes()
			x.Compressed = h.Flags&flagCompressed != 0
			x.ZeroedGrain = h.Flags&flagZeroGrain != 0
			x.RedundantGD = sp.rgd != nil
			in.Dirty = in.Dirty || h.UncleanShutdown
			if in.ClusterSize == 0 {
				in.ClusterSize = x.GrainSize
			}
		}
		in.Extents = append(in.Extents, x)
	}
	return in
}
