//! Some of a batch's examples, and block-diagonal operators on them.
//!
//! The blocks of a [`BatchedOperator`] are independent, so the operator of a batch can be
//! evaluated for some of its rows only, and assembled from evaluations that covered
//! different rows ([`RowBlocks`]): what lets a solver stop working on the examples that
//! are done.

use crate::BatchedOperator;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

/// Rows of a batch of `B` examples, ascending; the whole batch when every row is in it
/// (then [`Rows::index`] is None, and gathers and scatters are the identity).
#[derive(Debug, Clone)]
pub struct Rows {
    batch: usize,
    device: Device,
    rows: Vec<u32>,
    index: Option<Tensor>,
}

impl Rows {
    /// Every row of a batch of `batch`.
    pub fn all(batch: usize, device: &Device) -> Self {
        Self {
            batch,
            device: device.clone(),
            rows: (0..batch as u32).collect(),
            index: None,
        }
    }

    /// The rows where `keep` is true, of a batch of `keep.len()`.
    pub fn where_true(keep: &[bool], device: &Device) -> Result<Self> {
        let rows: Vec<u32> = (0..keep.len() as u32)
            .filter(|&b| keep[b as usize])
            .collect();
        Self::of(rows, keep.len(), device)
    }

    /// `rows` (ascending, each below `batch`) of a batch of `batch`.
    pub fn of(rows: Vec<u32>, batch: usize, device: &Device) -> Result<Self> {
        ensure!(
            rows.windows(2).all(|w| w[0] < w[1]) && rows.iter().all(|&r| (r as usize) < batch),
            "rows {rows:?} are not ascending rows of a batch of {batch}"
        );
        let index = if rows.len() == batch {
            None
        } else {
            Some(Tensor::from_vec(rows.clone(), rows.len(), device)?)
        };
        Ok(Self {
            batch,
            device: device.clone(),
            rows,
            index,
        })
    }

    /// The rows `positions` (ascending indices into these rows) of these rows.
    pub fn subset(&self, positions: &[usize]) -> Result<Self> {
        Self::of(
            positions.iter().map(|&p| self.rows[p]).collect(),
            self.batch,
            &self.device,
        )
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The size of the whole batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn is_all(&self) -> bool {
        self.index.is_none()
    }
    /// The row numbers.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }
    /// The row numbers as a `[r]` u32 tensor; None for the whole batch.
    pub fn index(&self) -> Option<&Tensor> {
        self.index.as_ref()
    }

    /// These rows of `t` (rows on dim 0): `[B, …]` → `[r, …]`.
    pub fn gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match &self.index {
            None => t.clone(),
            Some(i) => t.index_select(i, 0)?,
        })
    }

    /// `full` with these rows replaced by `part` (`[r, …]`): `[B, …]`.
    pub fn put(&self, full: &Tensor, part: &Tensor) -> Result<Tensor> {
        let Some(i) = &self.index else {
            return Ok(part.clone());
        };
        let mut keep = vec![0u8; self.batch];
        for &r in &self.rows {
            keep[r as usize] = 1;
        }
        let mut shape = vec![1; full.rank()];
        shape[0] = self.batch;
        let mask = Tensor::from_vec(keep, shape, full.device())?.broadcast_as(full.shape())?;
        let scattered = full.zeros_like()?.index_add(i, part, 0)?;
        Ok(mask.where_cond(&scattered, full)?)
    }

    /// `part` (`[r, …]`) in these rows of a `[B, …]` tensor of zeros.
    pub fn scatter(&self, part: &Tensor) -> Result<Tensor> {
        let Some(i) = &self.index else {
            return Ok(part.clone());
        };
        let mut shape = part.dims().to_vec();
        shape[0] = self.batch;
        Ok(Tensor::zeros(shape, part.dtype(), part.device())?.index_add(i, part, 0)?)
    }
}

/// The blocks of `rows` of a whole-batch operator, as an operator on `[r, n]`: each
/// product applies the whole batch's (the rows outside `rows` get zeros).
pub struct RowsOf {
    pub op: Box<dyn BatchedOperator>,
    pub rows: Rows,
}

impl BatchedOperator for RowsOf {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        self.rows.gather(&self.op.apply(&self.rows.scatter(v)?)?)
    }
}

/// One evaluation's operator and the rows it covers, in order.
struct Piece {
    rows: Rows,
    op: Box<dyn BatchedOperator>,
}

/// A batch's block-diagonal operator assembled from operators that each cover some of its
/// rows: every row's block is that of the latest piece that claimed it
/// ([`RowBlocks::cover`]). Pieces that no longer own a row are dropped.
#[derive(Default)]
pub struct RowBlocks {
    /// Per row of the batch: (piece, position of the row in that piece).
    owner: Vec<Option<(usize, usize)>>,
    pieces: Vec<Option<Piece>>,
}

impl RowBlocks {
    pub fn new(batch: usize) -> Self {
        Self {
            owner: vec![None; batch],
            pieces: Vec::new(),
        }
    }

    /// `op` (on `[rows.len(), n]`) becomes the block of the rows at `claim` (positions in
    /// `rows`).
    pub fn cover(&mut self, rows: &Rows, op: Box<dyn BatchedOperator>, claim: &[usize]) {
        let id = self.pieces.len();
        for &p in claim {
            self.owner[rows.rows()[p] as usize] = Some((id, p));
        }
        self.pieces.push(Some(Piece {
            rows: rows.clone(),
            op,
        }));
        self.drop_unowned();
    }

    /// Only the rows where `keep` is true (one entry per row of the batch) keep their
    /// blocks; the rest need none any more (an example done, or one whose block is stale).
    /// A piece left without a row is dropped, and with it the evaluation it holds (on the
    /// analytic passes, the forward caches of every row it was evaluated for).
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        anyhow::ensure!(
            keep.len() == self.owner.len(),
            "internal: {} flags for a batch of {}",
            keep.len(),
            self.owner.len()
        );
        for (owner, &k) in self.owner.iter_mut().zip(keep) {
            if !k {
                *owner = None;
            }
        }
        self.drop_unowned();
        Ok(())
    }

    /// No row keeps a block: every piece is dropped ([`RowBlocks::retain`] of nothing).
    pub fn clear(&mut self) {
        self.owner.fill(None);
        self.pieces.clear();
    }

    /// Drops the pieces that own no row.
    fn drop_unowned(&mut self) {
        let mut used = vec![false; self.pieces.len()];
        for (piece, _) in self.owner.iter().flatten() {
            used[*piece] = true;
        }
        for (slot, used) in self.pieces.iter_mut().zip(used) {
            if !used {
                *slot = None;
            }
        }
    }

    /// The rows one product of [`RowBlocks::on`]`(rows)` applies: those of every piece
    /// that owns one of `rows`.
    pub fn rows_applied(&self, rows: &Rows) -> Result<usize> {
        let mut used = vec![false; self.pieces.len()];
        for &r in rows.rows() {
            let Some((piece, _)) = self.owner.get(r as usize).copied().flatten() else {
                anyhow::bail!("internal: row {r} has no block");
            };
            used[piece] = true;
        }
        Ok(self
            .pieces
            .iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|(p, _)| p.as_ref().map_or(0, |p| p.rows.len()))
            .sum())
    }

    /// The operator of `rows` (every one covered) on `[rows.len(), n]`.
    pub fn on(&self, rows: &Rows) -> Result<RowBlocksOn<'_>> {
        let device = rows.device.clone();
        // Per piece: (positions in `rows`, positions in the piece).
        let mut parts: Vec<(usize, Vec<u32>, Vec<u32>)> = Vec::new();
        for (pos, &r) in rows.rows().iter().enumerate() {
            let Some((piece, at)) = self.owner.get(r as usize).copied().flatten() else {
                anyhow::bail!("internal: row {r} has no block");
            };
            match parts.iter_mut().find(|p| p.0 == piece) {
                Some(p) => {
                    p.1.push(pos as u32);
                    p.2.push(at as u32);
                }
                None => parts.push((piece, vec![pos as u32], vec![at as u32])),
            }
        }
        let mut blocks = Vec::with_capacity(parts.len());
        for (piece, pos, at) in parts {
            let p = self.pieces[piece]
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("internal: a dropped piece owns a row"))?;
            // The piece's operator as is when it is exactly these rows, in order.
            let whole = pos.len() == rows.len() && at.len() == p.rows.len();
            let to_tensor = |v: Vec<u32>| -> Result<Tensor> {
                let n = v.len();
                Ok(Tensor::from_vec(v, n, &device)?)
            };
            blocks.push(Block {
                op: p.op.as_ref(),
                piece_rows: p.rows.len(),
                index: if whole {
                    None
                } else {
                    Some((to_tensor(pos)?, to_tensor(at)?))
                },
            });
        }
        Ok(RowBlocksOn {
            rows: rows.len(),
            blocks,
        })
    }
}

struct Block<'a> {
    op: &'a dyn BatchedOperator,
    piece_rows: usize,
    /// (positions in the rows asked for, positions in the piece); None: the identity.
    index: Option<(Tensor, Tensor)>,
}

/// [`RowBlocks::on`]: a product applies each piece that owns one of the rows once.
pub struct RowBlocksOn<'a> {
    rows: usize,
    blocks: Vec<Block<'a>>,
}

impl BatchedOperator for RowBlocksOn<'_> {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        ensure!(v.dim(0)? == self.rows, "internal: {} rows", v.dim(0)?);
        let mut out: Option<Tensor> = None;
        for b in &self.blocks {
            let Some((pos, at)) = &b.index else {
                return b.op.apply(v);
            };
            let n = v.dim(1)?;
            let vp = Tensor::zeros((b.piece_rows, n), v.dtype(), v.device())?.index_add(
                at,
                &v.index_select(pos, 0)?,
                0,
            )?;
            let hp = b.op.apply(&vp)?.index_select(at, 0)?;
            let acc = match out.take() {
                Some(o) => o,
                None => Tensor::zeros((self.rows, n), v.dtype(), v.device())?,
            };
            out = Some(acc.index_add(pos, &hp, 0)?);
        }
        match out {
            Some(o) => Ok(o),
            None => Ok(v.zeros_like()?),
        }
    }
}
